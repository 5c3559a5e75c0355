"""Defects of interrupted pipelines and wrong implementations that earlier tests let
through: each test here failed on the code before its fix (or against the named wrong
implementation, swapped in by hand)."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

import ablations
import harness
import sample
import train_diffusion
import train_stand_in
import train_tokenizer
from losses import semantic_preservation_loss
from test_reliability import image_folder
from test_tokenizer import STAND_IN_TINY, TINY, TINY_ENCODER, TINY_TOKENIZER
from test_train_diffusion import save_tokenizer
from tokenizer import AlignTok

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
STAGE1 = ["--stage", "1", "--encoder-weights", "random", *TINY, *TINY_ENCODER, *TINY_TOKENIZER]
DIT = ["--num-images", "32", "--batch-size", "8", "--depth", "1", "--hidden-size", "32", "--num-heads", "2",
       "--log-every", "1", "--sample-columns", "2", "--sample-steps", "2"]


def load(path):
    return torch.load(path, weights_only=True)


def tiny_tokenizer(path, seed=0):
    torch.manual_seed(seed)
    tok = AlignTok("dinov2_vits14", dict(depth=1, embed_dim=32, num_heads=2, patch_size=8, img_size=32),
                   latent_channels=4, decoder_width=16, decoder_multipliers=(1, 2, 2, 2), decoder_res_blocks=1,
                   image_size=32, encoder_size=32)
    save_tokenizer(tok, path)
    return tok


def torchrun(script, *argv, timeout=240):
    port = str(29600 + os.getpid() % 300)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           port, str(script), *map(str, argv)], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, env=ENV)


#################################################################################
#                 Interrupted stages do not pass for finished ones              #
#################################################################################

def test_a_stage_stopped_in_its_latent_statistics_is_unfinished_and_refused_downstream(tmp_path, monkeypatch):
    """Defects 1 and 3: the last metrics line is written, the statistics are not; the
    checkpoint says unfinished, the sweep and --init and the DiT refuse it, --resume
    finishes it."""
    out = tmp_path / "s1"
    argv = STAGE1 + ["--out", str(out), "--steps", "2"]
    with monkeypatch.context() as patch:          # a signal during the statistics
        patch.setattr(train_tokenizer, "compute_latent_statistics", lambda *a: None)
        assert train_tokenizer.main(train_tokenizer.parse_args(argv)) == harness.STOPPED
    checkpoint = load(out / "checkpoint.pt")
    assert checkpoint["step"] == 2 and checkpoint["finished"] is False
    assert ablations.finished(str(out), 2) is False
    with pytest.raises(SystemExit, match=r"^error: --init .* is an unfinished run \(step 2 of 2; its latent "
                                         r"statistics not done\); finish it first: python train_tokenizer.py "
                                         r".*--stage 1 .*--resume"):
        train_tokenizer.main(train_tokenizer.parse_args(
            ["--stage", "2", *TINY, "--out", str(tmp_path / "s2"), "--init", str(out / "checkpoint.pt")]))
    with pytest.raises(SystemExit, match=r"^error: --tokenizer: .* is an unfinished stage-1 run"):
        train_diffusion.main(train_diffusion.parse_args(["--tokenizer", str(out / "checkpoint.pt"),
                                                         "--out", str(tmp_path / "dit"), *DIT]))
    assert train_tokenizer.main(train_tokenizer.parse_args(argv + ["--resume"])) is None
    checkpoint = load(out / "checkpoint.pt")
    assert checkpoint["finished"] is True and not torch.equal(checkpoint["ema"]["latent_std"], torch.ones(4))
    assert ablations.finished(str(out), 2) and not ablations.finished(str(out), 3)


def test_an_unfinished_stand_in_is_refused_as_encoder_weights(tmp_path, monkeypatch):
    out = tmp_path / "s0"
    monkeypatch.setattr(harness.StopSignal, "requested", lambda self, world_size: True)   # stops after step 1
    argv = ["--out", str(out), "--steps", "3", *STAND_IN_TINY, *TINY_ENCODER]
    assert train_stand_in.main(train_stand_in.parse_args(argv)) == harness.STOPPED
    assert load(out / "checkpoint.pt")["finished"] is False
    with pytest.raises(SystemExit, match=r"^error: --encoder-weights .* unfinished run \(step 1 of 3; its steps not "
                                         r"done\); finish it first: python train_stand_in.py .*--resume"):
        train_tokenizer.pretrained_encoder(train_tokenizer.parse_args(
            ["--stage", "1", *TINY, "--out", str(tmp_path / "s1"), "--encoder-weights", str(out / "checkpoint.pt")]))


def test_a_dit_killed_between_its_last_metrics_line_and_its_checkpoint_is_unfinished(tmp_path, monkeypatch):
    """Defect 2: killed at the final save, the folder holds the 2-step checkpoint and a
    metrics log that reaches step 4; the run is not finished at 4."""
    tok = str(tmp_path / "tok.pt")
    tiny_tokenizer(tok)
    out = tmp_path / "dit"
    argv = ["--tokenizer", tok, "--out", str(out), *DIT, "--resume"]
    train_diffusion.main(train_diffusion.parse_args(argv + ["--steps", "2"]))
    assert ablations.finished(str(out), 2)
    real_save = harness.save_checkpoint

    def killed_at_the_end(state, path):
        if state["step"] == 4:
            raise KeyboardInterrupt("killed")
        real_save(state, path)
    monkeypatch.setattr(harness, "save_checkpoint", killed_at_the_end)
    with pytest.raises(KeyboardInterrupt):
        train_diffusion.main(train_diffusion.parse_args(argv + ["--steps", "4"]))
    with open(out / "metrics.jsonl") as f:
        assert json.loads(f.read().splitlines()[-1])["step"] == 4     # what the sweep used to trust
    assert load(out / "checkpoint.pt")["step"] == 2
    assert not ablations.finished(str(out), 4)


def test_a_stopped_script_exits_75_so_that_the_demo_stops(tmp_path):
    """Defect 3: SIGINT saves and exits 75 (not 0), and run_demo.sh stops at such a step."""
    out = tmp_path / "s1"
    process = subprocess.Popen([sys.executable, "train_tokenizer.py", *STAGE1, "--out", str(out), "--steps",
                                "100000", "--sample-every", "100000"], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    os.killpg(process.pid, 2)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == harness.STOPPED == 75, stderr[-2000:]
    assert load(out / "checkpoint.pt")["finished"] is False

    shim = tmp_path / "bin"          # a python that stops (exit 75) in stage 1, as a Ctrl-C there would
    shim.mkdir()
    (shim / "python").write_text(f'#!/bin/sh\ncase "$*" in *"--stage 1"*) exit 75;; esac\nexec {sys.executable} "$@"\n')
    (shim / "python").chmod(0o755)
    env = dict(ENV, PATH=f"{shim}{os.pathsep}{ENV['PATH']}", DEMO_SCALE="0.003", DEMO_IMAGES="64")
    demo = subprocess.run(["bash", "run_demo.sh", str(tmp_path / "demo")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert demo.returncode == 75 and "'stage 1' did not finish (exit 75)" in demo.stderr, demo.stderr[-2000:]
    assert not (tmp_path / "demo" / "stage2").exists()


#################################################################################
#                       Runs in one folder, ranks that wait                     #
#################################################################################

def test_resume_reads_the_checkpoint_after_taking_the_lock(tmp_path, monkeypatch):
    """Defect 5: a run that finished between this run's start and its lock (here: written
    from inside lock_folder) is continued from, not overwritten by the older state."""
    argv = ["--out", str(tmp_path / "run"), *STAND_IN_TINY, *TINY_ENCODER]
    train_stand_in.main(train_stand_in.parse_args(argv + ["--steps", "2"]))
    train_stand_in.main(train_stand_in.parse_args(["--out", str(tmp_path / "other"), *STAND_IN_TINY,
                                                   *TINY_ENCODER, "--steps", "4"]))
    newer = (tmp_path / "other" / "checkpoint.pt").read_bytes()
    real_lock = harness.lock_folder

    def another_run_finishes_first(folder, *args, **kwargs):
        (tmp_path / "run" / "checkpoint.pt").write_bytes(newer)
        return real_lock(folder, *args, **kwargs)
    monkeypatch.setattr(harness, "lock_folder", another_run_finishes_first)
    trained = []
    monkeypatch.setattr(train_stand_in, "update_ema", lambda *a: trained.append(1))
    train_stand_in.main(train_stand_in.parse_args(argv + ["--steps", "4", "--resume"]))
    assert trained == []                        # it found the finished 4-step run: nothing left to train
    assert load(tmp_path / "run" / "checkpoint.pt")["step"] == 4


def test_the_wait_for_other_ranks_ends_on_a_stop_mark_a_gone_launcher_or_the_timeout(tmp_path):
    """Defect 6, the wait itself."""
    missing, stop_mark = [str(tmp_path / "never")], str(tmp_path / "stopped")
    with pytest.raises(SystemExit, match=r"^error: waited 0 s for 1 shards .*raise --wait-timeout"):
        harness.wait_for_files(missing, "shards", stop_mark, timeout=0.2, poll_s=0.05)
    open(stop_mark, "w").close()
    with pytest.raises(SystemExit) as stopped:
        harness.wait_for_files(missing, "shards", stop_mark, timeout=60, poll_s=0.05)
    assert stopped.value.code == harness.STOPPED
    # an orphan: its launcher (the middle process) exits while it waits
    orphan = (f"import sys; sys.path.insert(0, {ROOT!r}); import harness; "
              f"harness.wait_for_files([{missing[0]!r}], 'shards', 'no-stop-mark', timeout=60, poll_s=0.1)")
    launcher = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', {orphan!r}], "
                f"stderr=open({str(tmp_path / 'err')!r}, 'w')); print(p.pid, flush=True); time.sleep(8)")
    pid = int(subprocess.run([sys.executable, "-c", launcher], capture_output=True, text=True,
                             timeout=60).stdout.split()[0])
    deadline = time.time() + 60
    while time.time() < deadline and os.path.exists(f"/proc/{pid}") and \
            open(f"/proc/{pid}/stat").read().split()[2] != "Z":
        time.sleep(0.1)
    assert "the launcher of this process" in (tmp_path / "err").read_text() and "is gone" in \
        (tmp_path / "err").read_text()


def test_a_rank_stopped_while_sampling_leaves_a_mark_and_exits_75(tmp_path, monkeypatch):
    """Defect 6 in sample.py: the stopped rank leaves the mark rank 0's wait stops on."""
    tok = str(tmp_path / "tok.pt")
    tiny_tokenizer(tok)
    train_diffusion.main(train_diffusion.parse_args(["--tokenizer", tok, "--out", str(tmp_path / "dit"), *DIT,
                                                     "--steps", "1"]))
    original = harness.StopSignal.__init__

    def signalled(self):
        original(self)
        self.name = "SIGTERM"
    monkeypatch.setattr(harness.StopSignal, "__init__", signalled)
    out = tmp_path / "samples.npz"
    status = sample.main(["--ckpt", str(tmp_path / "dit" / "checkpoint.pt"), "--out", str(out), "--num-samples",
                          "6", "--shard-size", "2", "--steps", "2", "--device", "cpu"])
    assert status == harness.STOPPED and (tmp_path / "samples_shards" / "stopped").exists() and not out.exists()


def test_sample_refuses_a_tokenizer_that_changed_since_the_dit_trained(tmp_path):
    """Defect 7: a retrained file at the DiT's stored tokenizer path is refused, naming both."""
    tok = str(tmp_path / "tok.pt")
    tiny_tokenizer(tok)
    train_diffusion.main(train_diffusion.parse_args(["--tokenizer", tok, "--out", str(tmp_path / "dit"), *DIT,
                                                     "--steps", "1"]))
    grid = ["--ckpt", str(tmp_path / "dit" / "checkpoint.pt"), "--grid", str(tmp_path / "g.png"), "--steps", "2",
            "--per-class", "1", "--device", "cpu"]
    sample.main(grid)                                   # the same tokenizer: fine
    tiny_tokenizer(tok, seed=1)                         # retrained in place
    with pytest.raises(SystemExit, match=r"^error: the tokenizer .*tok.pt is not the one .* trained with \(its "
                                         r"weights hash \w{12}, the DiT's checkpoint records \w{12}\)"):
        sample.main(grid)


def test_max_bad_images_bounds_the_run_over_all_ranks(tmp_path):
    """Defect 4: 20 images, 4 unreadable, --max-bad-images 0.15 (3): two gloo ranks, neither
    of which sees more than 3 itself in the one epoch, stop together."""
    root = image_folder(tmp_path / "data", good=16)
    for i in range(4):
        (root / f"class{i % 2}" / f"bad{i}.png").write_bytes(b"not a png")
    result = torchrun("train_stand_in.py", "--data", root, "--out", tmp_path / "run", "--steps", "2",
                      "--batch-size", "5", "--image-size", "16", "--encoder-size", "16", *TINY_ENCODER,
                      "--log-every", "1", "--max-bad-images", "0.15")
    assert result.returncode != 0, result.stdout[-2000:]
    assert "error: 4 unreadable images" in result.stderr and "more than --max-bad-images 0.15 of 20" in result.stderr


#################################################################################
#                Wrong implementations that must fail a test                    #
#################################################################################

def test_the_dits_ema_follows_the_weights_after_each_optimiser_step(tmp_path, monkeypatch):
    """EMA_k = d_k EMA_{k-1} + (1 - d_k) W_k with W_k the weights after step k's update and
    d_k = min(decay, (1 + k) / (warmup + k)), k from 0: catches an EMA updated before the
    optimiser step, with the decay of step + 1, or one that never moves."""
    tok = str(tmp_path / "tok.pt")
    tiny_tokenizer(tok)
    snapshots = []
    real_step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        params = [p for group in self.param_groups for p in group["params"]]
        if not snapshots:
            snapshots.append([p.detach().clone() for p in params])        # W_0, the initial weights
        result = real_step(self, *args, **kwargs)
        snapshots.append([p.detach().clone() for p in params])
        return result
    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    train_diffusion.main(train_diffusion.parse_args(["--tokenizer", tok, "--out", str(tmp_path / "dit"), *DIT,
                                                     "--steps", "3", "--ema-decay", "0.9", "--ema-warmup", "2"]))
    expected = snapshots[0]
    for k, weights in enumerate(snapshots[1:]):
        d = min(0.9, (1 + k) / (2 + k))
        expected = [d * e + (1 - d) * w for e, w in zip(expected, weights)]
    checkpoint = load(tmp_path / "dit" / "checkpoint.pt")
    names = [n for n, p in train_diffusion.build_model(train_diffusion.parse_args(
        ["--tokenizer", tok, "--out", "x", *DIT]), (4, 4, 4), 10).named_parameters() if p.requires_grad]
    assert len(names) == len(expected)
    for name, value in zip(names, expected):
        torch.testing.assert_close(checkpoint["ema"][name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_semantic_preservation_sends_its_gradient_into_encoder_and_adapter():
    """L_sp with z.detach() would leave stage 2 a plain reconstruction stage: the gradient of
    w_sp L_sp at the adapter and the encoder is that of the MSE to the frozen copy."""
    torch.manual_seed(0)
    model = AlignTok("dinov2_vits14", dict(depth=1, embed_dim=32, num_heads=2, patch_size=4, img_size=16),
                     latent_channels=4, decoder_width=16, decoder_multipliers=(1, 2, 2), decoder_res_blocks=0,
                     image_size=16, encoder_size=16)
    reference = model.frozen_reference()
    model.set_trainable(2)
    with torch.no_grad():
        for p in model.adapter.parameters():
            p.add_(0.1 * torch.randn_like(p))             # stage 2 has moved away from stage 1
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    args = train_tokenizer.parse_args(["--stage", "2", "--out", "o", *TINY, "--sp-weight", "3"])
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(sp_weight):
        args.sp_weight = sp_weight
        loss, _, logs = train_tokenizer.tokenizer_loss(args, model, model, images, None, reference, None)
        return torch.autograd.grad(loss, params, allow_unused=True), logs["sp"]
    with_sp, sp = grads(3.0)
    without, _ = grads(0.0)
    z = model.encode(images)
    by_hand = torch.autograd.grad(3.0 * (z - reference.encode(images).detach()).pow(2).mean(), params,
                                  allow_unused=True)
    assert sp.item() > 0
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    reached = set()
    for name, a, b, c in zip(names, with_sp, without, by_hand):
        if c is None:
            continue
        torch.testing.assert_close(a - b, c, rtol=1e-4, atol=1e-8, msg=name)
        if c.abs().max() > 0:
            reached.add(name.split(".")[0])
    assert reached == {"encoder", "adapter"}


def test_sp_placement_features_compares_the_encoder_tokens(tmp_path, monkeypatch):
    """--sp-placement features must give L_sp the encoder's tokens (N, D, h*w, 1), not z."""
    seen = []
    monkeypatch.setattr(train_tokenizer, "semantic_preservation_loss",
                        lambda a, b, kind: seen.append((a.shape, b.shape)) or semantic_preservation_loss(a, b, kind))
    train_tokenizer.main(train_tokenizer.parse_args(STAGE1 + ["--out", str(tmp_path / "s1"), "--steps", "1"]))
    for placement, shape in (("latent", (8, 4, 4, 4)), ("features", (8, 32, 16, 1))):
        seen.clear()
        train_tokenizer.main(train_tokenizer.parse_args(
            ["--stage", "2", *TINY, "--out", str(tmp_path / placement), "--steps", "1", "--init",
             str(tmp_path / "s1" / "checkpoint.pt"), "--sp-placement", placement]))
        assert seen and all(a == b == shape for a, b in seen), (placement, seen)


def test_the_discriminator_loss_is_the_mean_over_micro_batches(tmp_path, monkeypatch):
    """Under --grad-accum 2 the discriminator's loss and gradient equal one batch's of the
    same images (AdamW hides a gradient twice too large, so the gradient is compared)."""
    grads = {}
    real_step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        if self.defaults["betas"] == (0.5, 0.9):        # the discriminator's optimiser (--disc-betas)
            grads.setdefault(tag[0], [p.grad.clone() for g in self.param_groups for p in g["params"]])
        return real_step(self, *args, **kwargs)
    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    gan = ["--disc-weight", "0.5", "--disc-start", "0", "--disc-layers", "2", "--disc-norm", "none",
           "--image-size", "32", "--encoder-size", "32",
           "--no-hflip"]
    tag = ["one"]
    logs = {}
    for accum, batch in (("1", "8"), ("2", "4")):      # the same 8 images a step
        tag[0] = accum
        out = tmp_path / accum
        train_tokenizer.main(train_tokenizer.parse_args(STAGE1 + gan + ["--out", str(out), "--steps", "1",
                                                                        "--grad-accum", accum, "--batch-size", batch]))
        logs[accum] = [line for line in open(out / "metrics.jsonl")][-1]
    d1, d2 = (json.loads(logs[a])["d_loss"] for a in ("1", "2"))
    assert d1 == pytest.approx(d2, rel=1e-4)
    for a, b in zip(grads["1"], grads["2"]):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-6)


def test_all_finite_is_one_decision_over_the_ranks(tmp_path):
    """A rank whose loss is inf skips the step with the others: rank 0, finite itself, says False."""
    script = tmp_path / "finite.py"
    script.write_text(f"import sys; sys.path.insert(0, {ROOT!r})\nimport torch\n"
                      "from training import all_finite, cleanup_distributed, setup_distributed\n"
                      "rank, world_size, _ = setup_distributed('cpu')\n"
                      "value = torch.tensor(float('inf') if rank == 1 else 1.0)\n"
                      "print(f'rank {rank}:', all_finite([torch.tensor(2.0), value], world_size), flush=True)\n"
                      "cleanup_distributed()\n")
    result = torchrun(script)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "rank 0: False" in result.stdout and "rank 1: False" in result.stdout


def test_the_cfg_interval_is_part_of_the_shard_key(tmp_path):
    tok = str(tmp_path / "tok.pt")
    tiny_tokenizer(tok)
    train_diffusion.main(train_diffusion.parse_args(["--tokenizer", tok, "--out", str(tmp_path / "dit"), *DIT,
                                                     "--steps", "1"]))
    argv = ["--ckpt", str(tmp_path / "dit" / "checkpoint.pt"), "--out", str(tmp_path / "s.npz"), "--num-samples",
            "4", "--steps", "2", "--cfg-scale", "2", "--device", "cpu"]
    sample.main(argv + ["--cfg-interval", "0.1"])
    with pytest.raises(SystemExit, match=r"other weights or settings \(cfg_interval\)"):
        sample.main(argv + ["--cfg-interval", "0.6"])


def test_the_seed_changes_the_noise():
    """torch keeps only a seed's low 32 bits: (seed << 32) + i made --seed a no-op."""
    shape = (4, 2, 2)
    assert not torch.equal(sample.sample_noise(0, [3], shape), sample.sample_noise(1, [3], shape))
    assert torch.equal(sample.sample_noise(0, [3], shape),
                       torch.randn(shape, generator=torch.Generator().manual_seed(3))[None])   # seed 0 as before
    noise = sample.sample_noise(5, range(64), shape).flatten(1)
    assert len({tuple(row.tolist()) for row in noise}) == 64                          # every sample its own
