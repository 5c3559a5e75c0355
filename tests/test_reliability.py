"""A preempted, crowded, full or dirty run loses nothing and says what happened in one line:
signals sent to real subprocesses, a second run in a held folder, a full disk (a real tmpfs
where the machine allows mounting one), killed writes, a torn metrics line, bad images and
flag values, and a soak test that kills a run with SIGKILL at random moments and checks that
the resumed end state equals an uninterrupted run's bit for bit."""
import argparse
import glob
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import harness
import latents
import sample
import train_diffusion
import train_stand_in
import train_tokenizer
from data import ImageFolderData
from test_tokenizer import STAND_IN_TINY, TINY, TINY_ENCODER, TINY_TOKENIZER
from test_tokenizer_long_runs import state_equal
from test_train_diffusion import save_tokenizer
from tokenizer import AlignTok

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
DIT = ["--num-images", "32", "--batch-size", "8", "--depth", "1", "--hidden-size", "32", "--num-heads", "2",
       "--log-every", "1", "--sample-every", "100000", "--sample-columns", "2", "--sample-steps", "2"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(tokenizer path, a latent cache folder already built for it, a DiT checkpoint)."""
    root = tmp_path_factory.mktemp("reliability")
    torch.manual_seed(0)
    tok = AlignTok("dinov2_vits14", dict(depth=1, embed_dim=32, num_heads=2, patch_size=8, img_size=32),
                   latent_channels=4, decoder_width=16, decoder_multipliers=(1, 2, 2, 2), decoder_res_blocks=1,
                   image_size=32, encoder_size=32)
    path = str(root / "tokenizer.pt")
    save_tokenizer(tok, path)
    cache = str(root / "cache")
    train_diffusion.main(train_diffusion.parse_args(["--tokenizer", path, "--out", str(root / "warm"),
                                                     "--cache-dir", cache, "--steps", "1", *DIT]))
    return path, cache, str(root / "warm" / "checkpoint.pt")


def dit_argv(tiny, out, steps, *extra):
    return ["--tokenizer", tiny[0], "--cache-dir", tiny[1], "--out", str(out), "--steps", str(steps), *DIT,
            *[str(e) for e in extra]]


def start(script, argv, code=None):
    """A real process in its own process group: the script, or `code` (python -c) with the
    script's argv."""
    command = [sys.executable, "-c", code, *argv] if code else [sys.executable, os.path.join(ROOT, script), *argv]
    return subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def wait_for(predicate, process, what, timeout=120):
    deadline = time.time() + timeout
    while not predicate():
        if process.poll() is not None:
            raise AssertionError(f"the process ended before {what}: {process.communicate()}")
        if time.time() > deadline:
            process.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def metric_lines(out):
    path = os.path.join(out, "metrics.jsonl")
    return open(path).read().count("\n") if os.path.exists(path) else 0


#################################################################################
#                        1 and 2: signals and the run lock                      #
#################################################################################

def test_sigterm_finishes_the_step_saves_and_a_second_run_is_refused(tiny, tmp_path):
    out = tmp_path / "run"
    process = start("train_diffusion.py", dit_argv(tiny, out, 100000, "--ckpt-every", "100000", "--workers", "1"))
    wait_for(lambda: metric_lines(out) >= 2, process, "two logged steps")
    # A second run in the same folder, while the first trains: refused, naming the holder.
    with pytest.raises(SystemExit, match=rf"^error: .*run is in use by another process \(PID {process.pid}\)"):
        train_diffusion.main(train_diffusion.parse_args(dit_argv(tiny, out, 3)))
    os.killpg(process.pid, signal.SIGTERM)            # as SLURM does: the data loader's worker gets it too
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == harness.STOPPED, stderr[-2000:]
    [line] = [line for line in stdout.splitlines() if line.startswith("stopped by SIGTERM")]
    step = int(line.split(" at step ")[1].split(";")[0])
    assert "--resume" in line and "Traceback" not in stderr
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == step and step >= 2
    assert [json.loads(r)["step"] for r in open(out / "metrics.jsonl")] == list(range(1, step + 1))


def test_under_torchrun_every_rank_stops_at_the_same_step(tiny, tmp_path):
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    out = tmp_path / "run"
    argv = ["--nproc_per_node", "2", "--master_port", port, os.path.join(ROOT, "train_diffusion.py"),
            *dit_argv(tiny, out, 100000, "--ckpt-every", "100000")]
    process = start(None, argv, code="from torch.distributed.run import main; main()")
    wait_for(lambda: metric_lines(out) >= 2, process, "two logged steps")
    os.killpg(process.pid, signal.SIGTERM)            # the launcher and both ranks, as SLURM sends it
    stdout, stderr = process.communicate(timeout=120)
    [line] = [line for line in stdout.splitlines() if line.startswith("stopped by SIGTERM")]
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert f"at step {checkpoint['step']};" in line and len(checkpoint["rng"]) == 2     # both ranks, one step
    assert "second SIGTERM" not in stderr


def test_sigint_stops_the_tokenizer_cleanly(tmp_path):
    out = tmp_path / "stage1"
    argv = ["--stage", "1", "--encoder-weights", "random", "--out", str(out), "--steps", "100000", *TINY,
            *TINY_ENCODER, *TINY_TOKENIZER, "--sample-every", "100000", "--workers", "1"]
    process = start("train_tokenizer.py", argv)
    wait_for(lambda: metric_lines(out) >= 1, process, "a logged step")
    os.killpg(process.pid, signal.SIGINT)             # as Ctrl-C does: to the whole foreground group
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == harness.STOPPED and "Traceback" not in stderr, stderr[-2000:]
    step = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    assert f"stopped by SIGINT at step {step}; saved" in stdout and "--resume" in stdout


def test_a_signal_during_the_latent_statistics_saves_the_weights_and_resume_finishes(tmp_path):
    out = tmp_path / "stage1"
    argv = ["--stage", "1", "--encoder-weights", "random", "--out", str(out), "--steps", "2", *TINY, *TINY_ENCODER,
            *TINY_TOKENIZER, "--num-images", "4000", "--stats-images", "4000", "--batch-size", "2", "--workers", "0"]
    process = start("train_tokenizer.py", argv)
    wait_for(lambda: metric_lines(out) >= 2, process, "the last step")          # then 2000 batches of statistics
    time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == harness.STOPPED and "Traceback" not in stderr, stderr[-2000:]
    assert "stopped by SIGTERM at step 2; saved" in stdout and "stage 1 done" not in stdout
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == 2 and (checkpoint["ema"]["latent_std"] == 1).all()       # weights, no statistics
    resumed = subprocess.run([sys.executable, "train_tokenizer.py", *argv, "--resume", "--stats-images", "64"],
                             cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0 and "stage 1 done: 2 steps" in resumed.stdout, resumed.stderr[-2000:]
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == 2 and not (checkpoint["ema"]["latent_std"] == 1).all()
    assert [json.loads(r)["step"] for r in open(out / "metrics.jsonl")] == [1, 2]


def test_sigterm_keeps_the_finished_sample_shards(tiny, tmp_path):
    out = tmp_path / "samples.npz"
    process = start("sample.py", ["--ckpt", tiny[2], "--out", str(out), "--num-samples", "400", "--shard-size", "2",
                                  "--batch-size", "2", "--steps", "2", "--device", "cpu"])
    shards = lambda: glob.glob(str(tmp_path / "samples_shards" / "shard_*.npz"))
    wait_for(lambda: len(shards()) >= 1, process, "a finished shard")
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == harness.STOPPED and "Traceback" not in stderr, stderr[-2000:]
    assert f"stopped by SIGTERM: {len(shards())} of 200 shards kept in" in stdout and not out.exists()
    assert all(len(np.load(path)["arr_0"]) == 2 for path in shards())


def test_an_echoed_signal_is_one_request_and_a_later_one_stops_at_once(monkeypatch):
    previous = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}
    monkeypatch.setattr(harness.StopSignal, "ECHO_SECONDS", 0.3)
    try:
        stop = harness.StopSignal()
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)          # torchrun forwarding the scheduler's signal
        assert stop.name == "SIGTERM" and stop.requested(1)
        time.sleep(0.4)
        with pytest.raises(SystemExit, match="^error: second SIGINT: stopped at once"):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


SLOW_SAVE = """
import sys, time, torch
import train_diffusion
save = torch.save
def slow_save(*args, **kwargs):   # the checkpoint is half written when the second signal comes
    save(*args, **kwargs)
    print("SAVING", flush=True)
    time.sleep(60)
torch.save = slow_save
train_diffusion.main(train_diffusion.parse_args(sys.argv[1:]))
"""


def test_a_second_signal_during_the_save_stops_at_once_without_a_partial_file(tiny, tmp_path):
    out = tmp_path / "run"
    process = start(None, dit_argv(tiny, out, 100000, "--ckpt-every", "100000"), code=SLOW_SAVE)
    wait_for(lambda: metric_lines(out) >= 1, process, "a logged step")
    process.send_signal(signal.SIGINT)
    wait_for(lambda: glob.glob(str(out / ".checkpoint.tmp*")), process, "the save")
    time.sleep(harness.StopSignal.ECHO_SECONDS)     # a repeat sooner than this is taken for torchrun's echo
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 1 and "second SIGINT: stopped at once" in stderr.strip().splitlines()[-1]
    assert not glob.glob(str(out / "*checkpoint*")) and not glob.glob(str(out / ".*tmp*"))


HOLD = ("import sys, time, harness; harness.lock_folder(sys.argv[1], name=sys.argv[2]); print('held', flush=True); "
        "time.sleep(120)")


def test_the_latent_cache_is_locked_while_built_and_released_when_its_holder_dies(tiny, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    [built] = glob.glob(os.path.join(tiny[1], "latents-*.npy"))          # the same key: same tokenizer and data
    holder = start(None, [str(cache), f".{os.path.basename(built)[:-4]}.lock"], code=HOLD)
    assert holder.stdout.readline().strip() == "held"
    argv = dit_argv(tiny, tmp_path / "run", 1)
    argv[argv.index("--cache-dir") + 1] = str(cache)
    with pytest.raises(SystemExit, match=rf"{cache} is in use by another process \(PID {holder.pid}\).*--cache-dir"):
        train_diffusion.main(train_diffusion.parse_args(argv))
    holder.kill()                                         # SIGKILL: no clean-up code runs, the OS drops the lock
    holder.wait()
    train_diffusion.main(train_diffusion.parse_args(argv))
    assert glob.glob(str(cache / "latents-*.json"))


def test_a_sample_folder_is_locked_while_written(tiny, tmp_path):
    holder = start(None, [str(tmp_path / "samples_shards"), ".lock"], code=HOLD)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(SystemExit, match=rf"samples_shards is in use by another process \(PID {holder.pid}\)"):
        sample.main(["--ckpt", tiny[2], "--out", str(tmp_path / "samples.npz"), "--num-samples", "2",
                     "--steps", "1", "--device", "cpu"])
    holder.kill()
    holder.wait()
    assert not glob.glob(str(tmp_path / "samples_shards" / "shard_*"))


def test_a_signal_during_the_latent_cache_build_stops_within_a_batch(tiny, tmp_path):
    cache = tmp_path / "cache"
    argv = dit_argv(tiny, tmp_path / "run", 5, "--num-images", "3000", "--cache-batch-size", "2", "--workers", "0")
    argv[argv.index("--cache-dir") + 1] = str(cache)
    process = start("train_diffusion.py", argv)
    wait_for(lambda: glob.glob(str(cache / "*.partial")), process, "the cache build", timeout=300)
    time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == harness.STOPPED and "Traceback" not in stderr, stderr[-2000:]
    assert "stopped by SIGTERM while encoding the latent cache" in stdout and "Rerun the same command" in stdout
    assert not glob.glob(str(cache / "latents-*.npy")) and not (tmp_path / "run" / "checkpoint.pt").exists()


def test_a_signal_ends_an_evaluation_in_one_line(monkeypatch):
    def interrupted(args):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)                                     # the handler interrupts this
        raise AssertionError("SIGTERM did not stop the command")
    monkeypatch.setitem(evaluate.COMMANDS, "metrics", interrupted)
    handler = signal.signal(signal.SIGTERM, lambda *_: pytest.fail("evaluate.py left SIGTERM unhandled"))
    try:
        with pytest.raises(SystemExit, match=r"^stopped by a signal: evaluate.py metrics wrote nothing unfinished"):
            evaluate.main(["metrics", "--samples", __file__, "--ref", __file__])
    finally:
        signal.signal(signal.SIGTERM, handler)


#################################################################################
#             3, 4, 5, 6: full disks, killed writes, torn metrics lines         #
#################################################################################

FILL = """
import sys, torch, harness
small, large = torch.zeros(64 * 1024), torch.zeros(1024 * 1024)       # 256 KB, then 4 MB
harness.save_checkpoint({"x": small}, sys.argv[1])
harness.save_checkpoint({"x": large}, sys.argv[1])
"""


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs, or None where mounting is not allowed."""
    folder = tmp_path / "disk"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(folder)], capture_output=True).returncode:
        yield None
        return
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so(small_disk, tmp_path):
    if small_disk is None:
        pytest.skip("mounting a tmpfs is not allowed here")
    path = str(small_disk / "checkpoint.pt")
    result = subprocess.run([sys.executable, "-c", FILL, path], cwd=ROOT, env=ENV, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip() == (f"error: no space left on {small_disk} writing {path}; the previous file (if "
                                     f"any) is kept, free some space and run again")
    assert torch.load(path, weights_only=True)["x"].numel() == 64 * 1024
    assert os.listdir(small_disk) == ["checkpoint.pt"]


FULL_CACHE = """
import sys, latents, train_diffusion
from tokenizer import AlignTok
def encode(*args):
    raise AssertionError("encoded on a full disk")
AlignTok.encode = encode
if sys.argv[1] == "after-the-check":       # the disk fills between the check and the reservation
    latents.harness.check_free_space = lambda *args: None
train_diffusion.main(train_diffusion.parse_args(sys.argv[2:]))
"""


def test_a_latent_cache_larger_than_a_real_disk_is_one_line_before_encoding(tiny, small_disk, tmp_path):
    """On a 2 MB tmpfs, a 4 MB cache: refused by the free-space check; and, where the disk
    filled after that check, by the reservation (posix_fallocate), with the partial file
    removed. Either way before any image is encoded, instead of a bus error mid-build.
    Real processes: the cache lock is held until the process ends."""
    if small_disk is None:
        pytest.skip("mounting a tmpfs is not allowed here")
    argv = dit_argv(tiny, tmp_path / "run", 1)
    argv[argv.index("--cache-dir") + 1] = str(small_disk)
    argv[argv.index("--num-images") + 1] = "8192"                     # 2 flips x 64 floats x 4 bytes an image
    expected = {"checked": r"^error: the latent cache needs 0.00 GiB in .*disk, which has 0.00 GiB free; free space "
                           r"or choose another --cache-dir$",
                "after-the-check": rf"^error: no space left on {small_disk} writing {small_disk}/latents-\w+\.npy"
                                   rf"\.\w+\.partial; the previous file \(if any\) is kept, free some space and run "
                                   rf"again$"}
    for case, line in expected.items():
        result = subprocess.run([sys.executable, "-c", FULL_CACHE, case, *argv], cwd=ROOT, env=ENV,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 1 and re.match(line, result.stderr.strip()), (case, result.stderr[-2000:])
        assert [name for name in os.listdir(small_disk) if not name.endswith(".lock")] == []


def test_an_unwritable_out_is_one_line_before_any_work(tiny, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit, match=r"^error: cannot write to --out .*file/run"):
        train_diffusion.main(train_diffusion.parse_args(dit_argv(tiny, blocker / "run", 1)))


def test_an_unwritable_evaluation_or_sample_output_is_one_line_before_any_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit, match=r"^error: cannot write --out .*file/stats.npz"):
        evaluate.main(["stats", "--data", "synthetic", "--out", str(blocker / "stats.npz")])
    with pytest.raises(SystemExit, match=r"^error: cannot write --grid .*file/grid.png"):
        sample.main(["--ckpt", __file__, "--grid", str(blocker / "grid.png")])   # checked before it is read


def test_free_space_is_checked_before_encoding_and_training(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(harness.shutil, "disk_usage", lambda path: argparse.Namespace(free=1000))
    monkeypatch.setattr(AlignTok, "encode", lambda *a: pytest.fail("encoded on a full disk"))
    argv = dit_argv(tiny, tmp_path / "run", 1)
    argv[argv.index("--cache-dir") + 1] = str(tmp_path / "cache")
    with pytest.raises(SystemExit, match=r"^error: the latent cache needs 0.00 GiB in .*cache, which has 0.00 GiB "
                                         r"free; free space or choose another --cache-dir"):
        train_diffusion.main(train_diffusion.parse_args(argv))
    monkeypatch.setattr(train_diffusion, "flow_loss", lambda *a: pytest.fail("trained with no room to save"))
    with pytest.raises(SystemExit, match=r"^error: a checkpoint needs 0.00 GiB in .*run, which has 0.00 GiB free"):
        train_diffusion.main(train_diffusion.parse_args(dit_argv(tiny, tmp_path / "run", 1)))


def test_stale_temporaries_of_dead_processes_are_removed_and_writes_are_fsynced(tmp_path, monkeypatch):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(dead.stdout)
    names = [f".checkpoint.tmp{dead}.pt", f".metrics.tmp{dead}.jsonl", f".checkpoint.tmp{os.getpid()}.pt",
             "checkpoint.pt"]
    for name in names:
        (tmp_path / name).write_text("x")
    harness.lock_folder(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted([".lock", names[2], names[3]])      # a living writer's stays
    events = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", str(b))) or replace(a, b))
    harness.save_checkpoint({"x": torch.ones(3)}, str(tmp_path / "new.pt"))
    assert events == [("fsync", str(tmp_path / f".new.tmp{os.getpid()}.pt")), ("replace", str(tmp_path / "new.pt")),
                      ("fsync", str(tmp_path))]


def test_a_torn_last_metrics_line_is_dropped_on_resume(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.9}\n{"step": 3, "lo')
    harness.trim_metrics(str(path), 2)
    assert path.read_text() == '{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.9}\n'
    assert "dropped the torn last line" in capsys.readouterr().out


#################################################################################
#                          7, 8, 9: odd and unreadable images               #
#################################################################################

def image_folder(root, good=8):
    """Two classes of small RGB PNGs."""
    rng = np.random.default_rng(0)
    for i in range(good):
        folder = root / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    root = image_folder(tmp_path / "data", good=0)
    (root / "class0").mkdir(parents=True)
    Image.fromarray(np.full((32, 32), 32768, dtype=np.uint16)).save(root / "class0" / "mid.png")   # 16-bit gray
    Image.fromarray(np.full((32, 32), 0.25, dtype=np.float32)).save(root / "class0" / "quarter.tiff")
    dataset = ImageFolderData(str(root), 16)
    assert {Image.open(p).mode for p, _ in dataset.folder.samples} <= {"I;16", "I", "F"}
    images = {os.path.basename(p): dataset[i][0] for i, (p, _) in enumerate(dataset.folder.samples)}
    assert torch.allclose(images["mid.png"], torch.full((3, 16, 16), 128 / 127.5 - 1), atol=1e-6)   # not white
    assert torch.allclose(images["quarter.tiff"], torch.full((3, 16, 16), 64 / 127.5 - 1), atol=1e-6)


def test_a_decompression_bomb_is_refused_before_decoding(tmp_path):
    root = image_folder(tmp_path / "data", good=0)
    (root / "class0").mkdir(parents=True)
    Image.new("RGB", (40000, 1)).save(root / "class0" / "line.png")            # 32 px items: 1.3M x 32 pixels
    with pytest.raises(RuntimeError, match=r"cannot read image .*line.png: 40000x1 px is beyond our limits"):
        ImageFolderData(str(root), 32)[0]


def test_unreadable_images_are_skipped_counted_and_bounded(tmp_path, capsys):
    root = image_folder(tmp_path / "data")
    (root / "class0" / "empty.png").write_bytes(b"")
    (root / "class1" / "notes.png").write_text("not an image")
    data = (root / "class0" / "0.png").read_bytes()
    (root / "class1" / "truncated.png").write_bytes(data[:len(data) // 2])
    argv = ["--data", str(root), *STAND_IN_TINY, *TINY_ENCODER, "--batch-size", "11", "--steps", "2"]
    train_stand_in.main(train_stand_in.parse_args(argv + ["--out", str(tmp_path / "ok"), "--max-bad-images", "0.3"]))
    skipped = [line for line in capsys.readouterr().out.splitlines() if line.startswith("skipped unreadable image")]
    assert sorted(line.split(": ")[0].split("/")[-1] for line in skipped) == ["empty.png", "notes.png", "truncated.png"]
    records = [json.loads(line) for line in open(tmp_path / "ok" / "metrics.jsonl")]
    assert [r["bad_images"] for r in records] == [3, 3]                 # every epoch sees all, each counted once
    # a resumed run goes on counting the run's images: the checkpoint keeps them, none is named twice
    assert len(torch.load(tmp_path / "ok" / "checkpoint.pt", weights_only=True)["bad_images"]) == 3
    train_stand_in.main(train_stand_in.parse_args(argv[:-1] + ["3", "--out", str(tmp_path / "ok"), "--resume",
                                                               "--max-bad-images", "0.3"]))
    assert "skipped unreadable image" not in capsys.readouterr().out
    records = [json.loads(line) for line in open(tmp_path / "ok" / "metrics.jsonl")]
    assert [r["bad_images"] for r in records] == [3, 3, 3]
    with pytest.raises(SystemExit, match=r"^error: 3 unreadable images .* more than --max-bad-images 0.1 of 11"):
        train_stand_in.main(train_stand_in.parse_args(argv + ["--out", str(tmp_path / "bad"),
                                                              "--max-bad-images", "0.1"]))


def test_evaluation_and_the_latent_cache_name_every_unreadable_image(tiny, tmp_path):
    root = image_folder(tmp_path / "data")
    (root / "class0" / "empty.png").write_bytes(b"")
    (root / "class1" / "notes.png").write_text("not an image")
    with pytest.raises(SystemExit, match=r"^error: 2 of 10 images of --data cannot be read .*empty.png.*; .*notes.png"):
        list(evaluate.dataset_batches(ImageFolderData(str(root), 16), 4, 0))
    with pytest.raises(SystemExit, match=r"^error: 2 images of --data cannot be read .*empty.png.*; .*notes.png"):
        train_diffusion.main(train_diffusion.parse_args(["--tokenizer", tiny[0], "--data", str(root), "--out",
                                                         str(tmp_path / "dit"), "--batch-size", "2"]))
    assert not glob.glob(str(tmp_path / "dit" / "latents" / "latents-*.json"))          # no cache committed


def test_empty_data_folders_are_one_line(tmp_path):
    (tmp_path / "none").mkdir()
    with pytest.raises(SystemExit, match=r"^error: --data .*none: Couldn't find any class folder"):
        ImageFolderData(str(tmp_path / "none"), 16)
    (tmp_path / "empty" / "class0").mkdir(parents=True)
    with pytest.raises(SystemExit, match=r"^error: --data .*empty: Found no valid file"):
        ImageFolderData(str(tmp_path / "empty"), 16)


#################################################################################
#                      10 and 11: bad files and flag values                     #
#################################################################################

def safetensors(path, header, data=b""):
    header = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def test_bad_encoder_weights_are_one_line_naming_the_file(tmp_path):
    (tmp_path / "huge.safetensors").write_bytes(struct.pack("<Q", 2 ** 62) + b"{}")
    cases = {
        tmp_path / "huge.safetensors": "header length 4611686018427387904 exceeds the file's 10 bytes",
        safetensors(tmp_path / "text.safetensors", b"not json"): "header is not JSON",
        safetensors(tmp_path / "dtype.safetensors", {"a": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 4]}},
                    b"\0" * 4): "dtype Q9",
        safetensors(tmp_path / "range.safetensors", {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}},
                    b"\0" * 4): "byte range 0..16",
    }
    dit_file = tmp_path / "dit.pt"
    torch.save({"model_config": {"depth": 1}, "model": {}, "latents": "abc"}, dit_file)
    cases[dit_file] = "is a train_diffusion.py .LightningDiT. checkpoint, but DINOv2 encoder weights were expected"
    for path, message in cases.items():
        args = train_tokenizer.parse_args(["--stage", "1", "--out", str(tmp_path / "out"), "--perceptual-weight", "0",
                                           "--encoder-weights", str(path)])
        with pytest.raises(SystemExit, match=rf"^error: --encoder-weights: {path}.*{message}"):
            train_tokenizer.pretrained_encoder(args)


def test_a_reference_without_sigma_is_refused_before_extraction(tmp_path):
    np.savez(tmp_path / "ref.npz", mu=np.zeros(3))
    np.savez(tmp_path / "samples.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(SystemExit, match=r"^error: --ref .*ref.npz holds \['mu'\]: neither mu and sigma"):
        evaluate.main(["metrics", "--samples", str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "ref.npz")])


def test_a_dit_file_as_tokenizer_is_one_line_in_sample(tiny, tmp_path):
    dit_file = tiny[2]
    with pytest.raises(SystemExit, match=rf"^error: --tokenizer: {dit_file} is not a tokenizer checkpoint"):
        sample.main(["--ckpt", dit_file, "--tokenizer", dit_file, "--out", str(tmp_path / "s.npz")])


def test_wrong_kinds_of_file_are_one_line_in_evaluation(tiny, tmp_path):
    dit_file, tensor_file = tiny[2], str(tmp_path / "tensor.pt")
    torch.save(torch.zeros(3), tensor_file)
    with pytest.raises(SystemExit, match=rf"^error: --tokenizer: {dit_file} is not a tokenizer checkpoint"):
        evaluate.main(["recon", "--tokenizer", dit_file, "--data", "synthetic", "--device", "cpu"])
    with pytest.raises(SystemExit, match=rf"^error: --stand-in: {tensor_file} holds a Tensor"):
        evaluate.main(["report", "--stand-in", tensor_file, "--tokenizer", tiny[0], "--samples", tensor_file,
                       "--data", "synthetic", "--recon-png", "r.png", "--samples-png", "s.png", "--device", "cpu"])


EVALUATE = evaluate.build_parser().parse_args
MISSING = [("train_tokenizer", train_tokenizer.parse_args, ["--stage", "2", "--perceptual-weight", "0", "--init"]),
           ("train_tokenizer", train_tokenizer.parse_args, ["--stage", "1", "--perceptual-weight", "0",
                                                            "--encoder-weights"]),
           ("train_tokenizer", train_tokenizer.parse_args, ["--stage", "1", "--encoder-weights", "random", "--data"]),
           ("train_tokenizer", train_tokenizer.parse_args, ["--stage", "1", "--encoder-weights", "random",
                                                            "--lpips-weights"]),
           ("train_tokenizer", train_tokenizer.parse_args, ["--stage", "1", "--encoder-weights", "random",
                                                            "--vgg-weights"]),
           ("train_diffusion", train_diffusion.parse_args, ["--tokenizer"]),
           ("train_diffusion", train_diffusion.parse_args, ["--data"]),
           ("sample", sample.parse_args, ["--ckpt"]),
           ("sample", sample.parse_args, ["--tokenizer"]),
           ("evaluate", EVALUATE, ["stats", "--data"]),
           ("evaluate", EVALUATE, ["stats", "--data", "synthetic", "--inception-weights"]),
           ("evaluate", EVALUATE, ["metrics", "--samples"]),
           ("evaluate", EVALUATE, ["metrics", "--ref"]),
           ("evaluate", EVALUATE, ["recon", "--tokenizer"]),
           ("evaluate", EVALUATE, ["recon", "--dinov2-weights"]),
           ("evaluate", EVALUATE, ["report", "--stand-in"]),
           ("evaluate", EVALUATE, ["report", "--samples"])]


@pytest.mark.parametrize("parse, argv", [m[1:] for m in MISSING], ids=[f"{m[0]} {m[2][-1]}" for m in MISSING])
def test_every_missing_input_path_is_refused_when_parsed(parse, argv, tmp_path, capsys):
    """Every file or folder a command reads is checked before any work, whichever flag names it."""
    missing = str(tmp_path / "nope" / "missing.pt")
    with pytest.raises(SystemExit) as error:
        parse(argv + [missing, "--out", str(tmp_path / "out")])
    assert error.value.code == 2
    assert f"argument {argv[-1]}: {missing} does not exist" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []                             # nothing was made


def test_encoder_sizes_that_do_not_fit_are_one_line_before_training(tmp_path):
    # the default encoder (patch 14) at the default 32 px: refused when the model is built
    with pytest.raises(SystemExit, match=r"^error: the model flags do not fit together: encoder_size 32 is not a "
                                         r"multiple of the encoder's patch size 14"):
        train_stand_in.main(train_stand_in.parse_args(["--out", str(tmp_path / "run"), "--num-images", "8",
                                                       "--workers", "0"]))
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


BAD_FLAGS = [(train_diffusion, f, v) for f, v in [
    ("--batch-size", "-1"), ("--batch-size", "0"), ("--sample-steps", "0"), ("--ckpt-every", "0"),
    ("--log-every", "0"), ("--sample-every", "0"), ("--steps", "-5"), ("--lr", "-1"), ("--lr", "nan"),
    ("--ema-decay", "2"), ("--label-dropout", "2"), ("--sample-cfg-interval", "5")]] + \
    [(train_tokenizer, f, v) for f, v in [("--batch-size", "-1"), ("--steps", "-5"), ("--lr", "nan"),
                                          ("--ema-decay", "2"), ("--ckpt-every", "0"), ("--disc-betas", "2")]] + \
    [(sample, f, v) for f, v in [("--num-samples", "0"), ("--cfg-scale", "-1"), ("--cfg-interval", "5"),
                                 ("--shift", "-1"), ("--batch-size", "-1"), ("--steps", "0")]] + \
    [(evaluate, f, v) for f, v in [("--batch-size", "0"), ("--k", "0"), ("--is-split-size", "-1")]]


@pytest.mark.parametrize("module, flag, value", BAD_FLAGS, ids=[f"{m.__name__}{f}={v}" for m, f, v in BAD_FLAGS])
def test_numeric_flags_are_checked_at_parse_time(module, flag, value, capsys):
    existing = __file__    # input paths must exist
    required = {train_diffusion: ["--tokenizer", existing, "--out", "o"],
                train_tokenizer: ["--stage", "1", "--out", "o"],
                sample: ["--ckpt", existing, "--out", "o.npz"],
                evaluate: ["metrics", "--samples", existing, "--ref", existing]}[module]
    values = [value, value] if flag == "--disc-betas" else [value]
    parse = evaluate.build_parser().parse_args if module is evaluate else module.parse_args
    with pytest.raises(SystemExit) as error:
        parse(required + [flag, *values])
    assert error.value.code == 2 and f"argument {flag}" in capsys.readouterr().err


#################################################################################
#                         Soak: SIGKILL at random moments                       #
#################################################################################

KILLS = 20
# A parent that has imported torch forks one child per attempt and SIGKILLs it at a random
# moment: real processes and real kills, without paying Python's start-up 20 times. The
# moments are spread over a twelfth of an uninterrupted run, so they land in start-up, steps
# and saves, and 20 kills leave the run unfinished.
ZYGOTE = """
import os, random, signal, sys, time
import train_diffusion
seed, kills, span, argv = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4:]
rng, done = random.Random(seed), 0
while done < kills:
    child = os.fork()
    if child == 0:
        try:
            train_diffusion.main(train_diffusion.parse_args(argv))
        finally:
            os._exit(0)
    time.sleep(rng.uniform(0, span))
    os.kill(child, signal.SIGKILL)
    _, status = os.waitpid(child, 0)
    print("killed" if os.WIFSIGNALED(status) else "finished", flush=True)
    if not os.WIFSIGNALED(status):
        break
    done += 1
"""


def test_random_sigkills_then_resumes_end_bit_exact(tiny, tmp_path):
    steps = 80
    argv = lambda out: dit_argv(tiny, out, steps, "--ckpt-every", "3")
    started = time.time()
    train_diffusion.main(train_diffusion.parse_args(argv(tmp_path / "straight")))
    span = time.time() - started
    out = tmp_path / "killed"
    process = start(None, ["0", str(KILLS), f"{span / 12:.2f}", *argv(out), "--resume"], code=ZYGOTE)
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0 and stdout.count("killed") == KILLS, stderr[-2000:]
    if "finished" not in stdout:
        result = subprocess.run([sys.executable, "train_diffusion.py", *argv(out), "--resume"], cwd=ROOT, env=ENV,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(out / "checkpoint.pt", weights_only=True)
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert a["step"] == b["step"] == steps and state_equal(a["optimizer"], b["optimizer"])
    strip = lambda out: [{k: v for k, v in json.loads(line).items() if k != "sec_per_step"}
                         for line in open(out / "metrics.jsonl")]
    assert strip(out) == strip(tmp_path / "straight")
    assert not glob.glob(str(out / ".*tmp*"))                     # killed writes were cleaned up at the next start
