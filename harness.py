"""
Run harness: a reader can skip this file. What keeps a week-long run alive and its files
whole: argparse types that refuse bad flags before any work, the run folder's lock, stop
signals, atomic fsynced writes, free-space checks, the resume-compatibility check, RNG state
for exact resume, the metrics log and the image and npz writers. Nothing here holds global
state but the folder locks this process holds (lock_folder); every function takes what it
works on.

Every file the project writes, and who reads it (torch.save dicts are always read back
with weights_only=True; every write goes through atomic_path):

train_stand_in.py and train_tokenizer.py <out>/checkpoint.pt
    stage, step, args (vars of the command line), rng (one RNG state per rank),
    model, ema, optimizer                 state dicts of the trained module and its EMA
    stage 0 (the stand-in): stand_in_config  EncoderClassifier(**stand_in_config)
    stages 1-3: tokenizer_config          AlignTok(**tokenizer_config); the latent statistics
                                          are the buffers latent_mean / latent_std (set after
                                          the end of each stage; mean 0, std 1 before)
    with the GAN: discriminator, disc_optimizer, disc_config
    read by: load_tokenizer and load_stand_in (tokenizer.py), train_tokenizer.py --init,
    --encoder-weights and --resume.
train_diffusion.py <out>/checkpoint.pt
    model_config, model, ema, optimizer, step, args (with the tokenizer's absolute path),
    rng, skipped (non-finite steps), num_classes, latents (the latent cache key)
    read by: load_dit (dit.py), train_diffusion.py --resume, sample.py.
latent cache <cache-dir>/latents-<key>.npy and latents-<key>.json
    (N, 2, C, h, w) raw latents of every image and its flip; the .json header holds the
    fingerprint whose hash is <key>, the shape and the source paths (see latents.py).
sample.py <out>.npz (arr_0 uint8 images (N, H, W, 3), arr_1 int64 labels, settings: the
    JSON of the weight hashes, step and flags they came from) and <out>_shards/ with
    settings.json (the same JSON) and shard_*.npz.
evaluate.py stats <out>.npz: mu, sigma, mu_s, sigma_s, pool, preprocess (the Inception input mode).
metrics.jsonl: one JSON object per logging window (MetricsLog).
<out>/.lock: the PID of the run that holds the folder (lock_folder); the lock itself is the OS's
    flock on it, released when that process ends, so the file never needs removing by hand.
"""
import argparse
import contextlib
import errno
import fcntl
import json
import math
import os
import re
import shlex
import shutil
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from plot import training_curves
from training import all_reduce_mean, barrier
from weights import read_weights


#################################################################################
#                 Command-line numbers and paths, checked at parse time         #
#################################################################################

def _checked(kind, test, wanted):
    """An argparse type: the number, or argparse's one-line error naming what is wanted."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {wanted}") from None
        if not math.isfinite(value) or not test(value):    # nan fails every comparison, so it is named
            raise argparse.ArgumentTypeError(f"{text} is not {wanted}")
        return value
    parse.__name__ = wanted
    return parse


positive_int = _checked(int, lambda v: v > 0, "a positive integer")
non_negative_int = _checked(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _checked(float, lambda v: v > 0, "a positive finite number")
non_negative_float = _checked(float, lambda v: v >= 0, "a finite number >= 0")
unit_interval = _checked(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
below_one = _checked(float, lambda v: 0 <= v < 1, "a number in [0, 1)")


def input_path(*words):
    """An argparse type for a file or folder the command reads: a missing one is refused
    when the flags are parsed, before any work. `words` are values that name no path
    (e.g. 'synthetic', 'random')."""
    def parse(text):
        if text in words or os.path.exists(text):
            return text
        alternatives = f" (or pass {' or '.join(words)})" if words else ""
        raise argparse.ArgumentTypeError(f"{text} does not exist{alternatives}")
    parse.__name__ = "an existing path"
    return parse


#################################################################################
#                 Run folders: lock, stale temporaries, stop signals            #
#################################################################################

_held_locks = {}    # lock path -> lock file of this process: a second main() in one process (tests) reuses it


def lock_folder(folder, flag="--out", new_file=None, name=".lock"):
    """Holds an exclusive OS lock (flock) on <folder>/<name> for the life of this process, so that
    a second run in the same folder is refused with the holder's PID. The OS drops the lock
    when the process ends, however it ends, so no stale lock ever needs removing. Creating the
    lock file is also the start-up check that the folder can be written. Returns the open lock
    file, which this process keeps until it ends. new_file: a path that must still not exist
    once the lock is held (a fresh run's checkpoint, which a run that held the folder between
    this run's start-up checks and its lock may have written)."""
    key = os.path.realpath(os.path.join(folder, name))
    if key in _held_locks and not _held_locks[key].closed:
        return _held_locks[key]
    try:
        os.makedirs(folder, exist_ok=True)
        handle = open(key, "a+")
    except OSError as error:
        raise SystemExit(f"error: cannot write to {flag} {folder} ({error.strerror}); choose a writable folder") \
            from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise SystemExit(f"error: {folder} is in use by another process (PID {holder}); wait for it to end or "
                         f"choose another {flag} (nothing was written)") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    if new_file is not None and os.path.exists(new_file):
        raise SystemExit(f"error: {new_file} was written by another run while this one started; pass --resume to "
                         f"continue it or choose another {flag} (nothing was overwritten)")
    remove_stale_temporaries(folder)
    _held_locks[key] = handle
    return handle


def read_or_exit(load, path, flag):
    """load(path), or one error line naming the flag and what is wrong with its file (the
    loaders say what the file is and what was expected)."""
    try:
        return load(path)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {flag}: {error}") from None


def check_writable(path, flag="--out"):
    """One error line at start-up, before any work, when the folder of an output file cannot
    be written (a probe file is created there and removed)."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".probe.tmp{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as error:
        raise SystemExit(f"error: cannot write {flag} {path} ({error.strerror}); choose a writable place") from None


def check_free_space(folder, needed, what, flag="--out"):
    """One error line at start-up when `folder` has less free space than `needed` bytes for `what`."""
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise SystemExit(f"error: {what} needs {needed / 2 ** 30:.2f} GiB in {folder}, which has {free / 2 ** 30:.2f} "
                         f"GiB free; free space or choose another {flag}")


def checkpoint_bytes(model):
    """About what a checkpoint of `model` takes: the weights, their EMA and AdamW's two moments."""
    return 4 * sum(t.numel() * t.element_size() for t in model.state_dict().values())


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:      # someone else's process
        return True
    return True


def remove_stale_temporaries(folder):
    """Removes the atomic_path temporaries (.NAME.tmpPID.EXT) of processes that are gone:
    what a killed write left behind. A living process's temporary is its write in progress."""
    for name in os.listdir(folder):
        match = re.fullmatch(r"\..+\.tmp(\d+)(\.\w+)?", name)
        if match and not _alive(int(match.group(1))):
            os.remove(os.path.join(folder, name))


# The exit status of a run stopped by a signal before it finished its work (BSD's EX_TEMPFAIL,
# "try again"): not 0, so that a pipeline (run_demo.sh, a job script under set -e) stops
# there instead of going on with an unfinished stage; the same command continues it.
STOPPED = 75


class StopSignal:
    """SIGTERM (preemption by SLURM or Kubernetes) and SIGINT (Ctrl-C) ask the loop to stop
    after its current step, so that it can save and exit cleanly, instead of killing it. A
    second signal stops at once: its exception unwinds through atomic_path, which removes the
    partial file, so the previous checkpoint stays whole."""

    # torchrun forwards the signal it gets to its workers, so a job whose scheduler signals
    # every process (SLURM does) delivers one stop request twice within milliseconds: a repeat
    # inside this window is that echo, not a second request.
    ECHO_SECONDS = 2.0

    def __init__(self):
        self.name, self.time = None, None
        for number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(number, self._handle)

    def _handle(self, number, frame):
        name = signal.Signals(number).name
        if self.name is not None and time.monotonic() - self.time < self.ECHO_SECONDS:
            return
        if self.name is not None:
            raise SystemExit(f"error: second {name}: stopped at once; the last complete checkpoint is kept")
        self.name, self.time = name, time.monotonic()
        print(f"\n{name}: finishing the current step, then saving (send it again to stop at once)",
              file=sys.stderr, flush=True)

    def requested(self, world_size):
        """True on every rank once any rank got a signal (one all-reduce), so that all ranks
        stop at the same step even when the signals arrive at different moments."""
        return all_reduce_mean(float(self.name is not None), world_size) > 0

    def report(self, step, path):
        print(f"stopped by {self.name or 'a signal on another rank'} at step {step}; saved {path}. "
              f"Continue with the same command plus --resume", flush=True)


#################################################################################
#                       Waiting for other ranks, giving up                      #
#################################################################################

def stop_if_beyond_repair(bad_in_a_row, max_bad_steps, step, checkpoint_path, hint):
    """A run of non-finite steps (each skipped: no update, the batch spent) means the weights
    are beyond repair: stop without saving, so that checkpoint_path keeps the last good state."""
    if bad_in_a_row >= max_bad_steps:
        raise SystemExit(f"error: {bad_in_a_row} non-finite steps in a row at step {step}; stopped without saving, "
                         f"{checkpoint_path} holds the last good state ({hint})")


def wait_for_files(paths, what, stop_file, timeout, stop=None, poll_s=2.0):
    """Waits until every path exists: how a rank waits for the other ranks' work (sample
    shards, latent cache parts). A barrier there would time out whenever the work is
    uneven (NCCL kills the waiting ranks after 10 minutes). The wait ends early, with one
    line, when a rank that got a signal left stop_file (it stopped after its own share),
    when this rank got one itself (stop), when the launcher that started this process is
    gone (an orphan would poll forever), or after `timeout` seconds (--wait-timeout)."""
    parent, start = os.getppid(), time.monotonic()
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        print(f"waiting for {len(missing)} {what} from the other ranks")
    while missing:
        if os.path.exists(stop_file) or (stop is not None and stop.name is not None):
            print(f"stopped while waiting for {what}: a rank got a signal; run the same command again to "
                  f"continue", flush=True)
            raise SystemExit(STOPPED)
        if os.getppid() != parent:
            raise SystemExit(f"error: the launcher of this process (PID {parent}) is gone while it waited for "
                             f"{len(missing)} {what}; run the same command again")
        if time.monotonic() - start > timeout:
            raise SystemExit(f"error: waited {timeout:.0f} s for {len(missing)} {what} (the first: {missing[0]}); "
                             f"check the other ranks' output, or raise --wait-timeout")
        time.sleep(poll_s)
        missing = [p for p in missing if not os.path.exists(p)]


#################################################################################
#                           Checkpoints (atomic) and RNG                        #
#################################################################################

def _fsync(path):
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _mount_point(path):
    while not os.path.ismount(path):
        path = os.path.dirname(path)
    return path


def no_space_left(folder, path):
    """The one line for a write that met a full disk."""
    return SystemExit(f"error: no space left on {_mount_point(folder)} writing {path}; the previous file (if any) "
                      f"is kept, free some space and run again")


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path beside `path` to write to; on success renames it over
    `path`, so a crash leaves the old file or the new one, never half of one. The
    temporary keeps the extension, for writers that choose the format by it. The data is
    fsynced before the rename and the folder after it: without that, a power loss can leave
    the new name pointing at an empty file. A full disk ends in one line, the old file kept."""
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    stem, extension = os.path.splitext(name)
    temporary = os.path.join(folder, f".{stem}.tmp{os.getpid()}{extension}")
    try:
        yield temporary
        _fsync(temporary)
        os.replace(temporary, path)
        _fsync(folder)
    except (OSError, RuntimeError) as error:
        # torch.save reports a full disk as a RuntimeError without the errno ("unexpected pos"),
        # so a failed write on a disk that is (nearly) full is taken for one
        if getattr(error, "errno", None) == errno.ENOSPC or shutil.disk_usage(folder).free < 2 ** 24:
            raise no_space_left(folder, path) from None
        raise
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def save_checkpoint(state, path):
    with atomic_path(path) as temporary:
        torch.save(state, temporary)


def load_checkpoint(path, what="checkpoint", hint="check the path"):
    """A training checkpoint, or SystemExit with one line naming the problem."""
    try:
        return read_weights(path, what, hint)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None


# Flags that may differ when a run is resumed: they change how long it runs, what it logs
# and how fast, never the data order, the RNG stream or the loss. Everything else must match.
RESUME_MAY_CHANGE = {"steps", "resume", "out", "log_every", "sample_every", "ckpt_every", "workers", "compile",
                     "compile_backend", "grad_checkpoint", "max_bad_steps", "max_bad_images", "cache_dir",
                     "cache_batch_size", "wait_timeout",
                     "stats_images", "sample_columns", "sample_steps", "sample_cfg_scale", "sample_cfg_interval"}
PATH_FLAGS = {"init", "data", "tokenizer", "encoder_weights", "vgg_weights", "lpips_weights"}
# Flags added after runs were saved without them: such a run had the value given here.
ADDED_LATER = {"grad_accum": 1}


def _comparable(name, value):
    if name in PATH_FLAGS and isinstance(value, str) and value not in ("synthetic", "random"):
        return os.path.abspath(value)
    return list(value) if isinstance(value, tuple) else value


def open_run(args, rank, world_size, kind_check):
    """(checkpoint path, the run's checkpoint when resuming, else None). To resume, rank 0
    first takes the run folder's lock (held until the process ends), and every rank reads
    the checkpoint only after that: a run that finished while this one started (a requeued
    job beside the draining one) is then read, not overwritten by an older state. (A fresh
    run takes the lock later, once its inputs are checked, so that a refused command leaves
    no folder; lock_folder's new_file check covers its race.) An existing run is never
    overwritten: without --resume it is an error. kind_check(checkpoint) returns an error
    text when the file belongs to another kind of run. --resume continues exactly, so it
    refuses another number of processes, or any changed flag outside RESUME_MAY_CHANGE
    (a changed --batch-size, --seed or --data would change the data order and the per-rank
    RNG; a changed --lr or loss weight, the run)."""
    path = os.path.join(args.out, "checkpoint.pt")
    if rank == 0 and args.resume and os.path.exists(path):
        lock_folder(args.out)
    barrier(world_size)
    if not os.path.exists(path):
        return path, None
    if not args.resume:
        raise SystemExit(f"error: {path} exists; pass --resume to continue that run or choose another --out "
                         f"(nothing was overwritten)")
    checkpoint = load_checkpoint(path)
    problem = kind_check(checkpoint)
    if problem:
        raise SystemExit(f"error: {path} {problem}")
    if len(checkpoint["rng"]) != world_size:
        raise SystemExit(f"error: {path} was written by {len(checkpoint['rng'])} process(es), this is {world_size}; "
                         f"resume it with the same (torchrun --nproc_per_node={len(checkpoint['rng'])} ...)")
    current = vars(args)
    saved = dict({name: value for name, value in ADDED_LATER.items() if name in current}, **checkpoint["args"])
    changed = [f"--{name.replace('_', '-')} {current.get(name)!r} (the run has {saved.get(name)!r})"
               for name in sorted(set(saved) | set(current)) if name not in RESUME_MAY_CHANGE
               and _comparable(name, saved.get(name)) != _comparable(name, current.get(name))]
    if changed:
        raise SystemExit(f"error: --resume continues {path} exactly, but these flags differ: {'; '.join(changed)}. "
                         f"Pass the run's values, or start a new run in another --out")
    return path, checkpoint


def resume_command(script, args):
    """The command line that continues a run, from the args dict its checkpoint keeps."""
    words = ["python", script]
    for name, value in dict(args, resume=True).items():
        flag = "--" + name.replace("_", "-")
        if value is None or value is False:
            continue
        words += [flag] if value is True else [flag, *map(str, value)] if isinstance(value, (list, tuple)) \
            else [flag, str(value)]
    return shlex.join(words)


def unfinished(checkpoint, what):
    """None for a run that finished its work (its steps and, for a tokenizer, the latent
    statistics), else one line saying what is missing and the command that finishes it.
    Checkpoints written before runs recorded this count as finished."""
    if checkpoint.get("finished", True):
        return None
    script = "train_stand_in.py" if checkpoint.get("stage") == 0 else \
        "train_diffusion.py" if "model_config" in checkpoint else "train_tokenizer.py"
    missing = "its steps" if checkpoint["step"] < checkpoint["args"]["steps"] else "its latent statistics"
    return (f"{what} is an unfinished run (step {checkpoint['step']} of {checkpoint['args']['steps']}; {missing} "
            f"not done); finish it first: {resume_command(script, checkpoint['args'])}")


def gather_rng_states(world_size, *models):
    """Every rank's RNG state, in rank order (all ranks must call it). Also checks that the
    ranks' weights are identical, the model's and its EMA's (a sum of every value, compared
    on rank 0): a silent divergence would otherwise surface only as a worse model days later."""
    checksum = sum(v.detach().double().sum() for m in models for v in m.state_dict().values()
                   if v.is_floating_point()).item()              # one device sync, not one per tensor
    if world_size == 1:
        return [rng_state()]
    gathered = [None] * world_size
    dist.all_gather_object(gathered, (rng_state(), checksum))
    checksums = [c for _, c in gathered]
    if max(checksums) != min(checksums):
        raise RuntimeError(f"the ranks' weights differ (parameter sums {checksums}); DDP lost sync")
    return [state for state, _ in gathered]


def rng_state():
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


#################################################################################
#                             Metrics file and images                           #
#################################################################################

def trim_metrics(path, step):
    """Drops the records logged after `step` (by a run that stopped before its next checkpoint),
    so that a resumed run's metrics.jsonl reads as if it had never stopped."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    if lines:
        try:
            json.loads(lines[-1])
        except json.JSONDecodeError:    # the process died while appending it
            print(f"note: dropped the torn last line of {path} (its run was killed while writing it)")
            lines.pop()
    kept = [line for line in lines if json.loads(line)["step"] <= step]
    with atomic_path(path) as temporary, open(temporary, "w") as f:
        f.writelines(line if line.endswith("\n") else line + "\n" for line in kept)


class MetricsLog:
    """Named values of each step, averaged over a logging window and over the ranks, and
    appended to metrics.jsonl as one JSON line per window by rank 0, which also redraws the
    run folder's curves.png from it. Values stay tensors on
    their device until the window is written, so logging never synchronises a GPU step.
    sec_per_step divides the window's time by its own number of steps (a shorter last window
    included). A name seen before but with no value in this window is logged as None."""

    def __init__(self, path, rank, world_size):
        self.path, self.rank, self.world_size = path, rank, world_size
        self.names = {}                                      # every name seen, in order
        self.sums, self.counts, self.steps, self.start = {}, {}, 0, time.time()

    def add(self, values):
        """One step's values: a dict of name -> float or 0-d tensor."""
        for name, value in values.items():
            value = value.detach().float() if torch.is_tensor(value) else float(value)
            self.sums[name] = self.sums.get(name, 0.0) + value
            self.counts[name] = self.counts.get(name, 0) + 1
            self.names[name] = None
        self.steps += 1

    def skip(self):
        """A step that counts towards the window's time but has no values."""
        self.steps += 1

    def write(self, **fixed):
        """Averages the window over ranks (every rank calls this at the same step), writes the
        record with the `fixed` values on rank 0, starts a new window and returns the record."""
        present = [n for n in self.names if n in self.sums]
        means = all_reduce_mean([float(self.sums[n] / self.counts[n]) for n in present], self.world_size) \
            if present else []
        record = dict.fromkeys(self.names)
        record.update(zip(present, means))
        record.update(fixed, sec_per_step=(time.time() - self.start) / max(self.steps, 1))
        if self.rank == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            # A picture a student can watch while the run goes on.
            with atomic_path(os.path.join(os.path.dirname(self.path), "curves.png")) as temporary:
                training_curves(self.path).save(temporary)
        self.sums, self.counts, self.steps, self.start = {}, {}, 0, time.time()
        return record


def save_npz(path, **arrays):
    """np.savez written atomically, so a reader (or a resumed run) never sees half a file."""
    with atomic_path(path) as temporary, open(temporary, "wb") as f:
        np.savez(f, **arrays)


def save_json(path, data):
    with atomic_path(path) as temporary, open(temporary, "w") as f:
        json.dump(data, f, indent=2)


def save_grid(images, path, nrow, padding=2):
    """Saves images in [-1, 1] (N, 3, H, W) as one PNG grid, nrow to a row with `padding`
    black pixels around each, written atomically. (torchvision's save_image draws the same
    grid, but importing torchvision costs each script 1.4 s of its start-up.)"""
    n, c, h, w = images.shape
    rows, columns = -(-n // nrow), min(nrow, n)
    grid = torch.zeros(c, rows * (h + padding) + padding, columns * (w + padding) + padding)
    for i, image in enumerate((images.detach().float().cpu().clamp(-1, 1) + 1) / 2):
        top, left = padding + (i // nrow) * (h + padding), padding + (i % nrow) * (w + padding)
        grid[:, top:top + h, left:left + w] = image
    pixels = (grid * 255 + 0.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()   # (H', W', 3)
    with atomic_path(path) as temporary:
        Image.fromarray(pixels).save(temporary, format="PNG")
