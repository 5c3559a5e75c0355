"""
What train_tokenizer.py and train_diffusion.py share: the torchrun/DDP setup, the one
EMA helper, the one checkpoint writer, RNG state for exact resume, the metrics file and
image grids. Nothing here holds global state; every function takes what it works on.
"""
import contextlib
import json
import os

import torch
import torch.distributed as dist
from torchvision.utils import save_image


#################################################################################
#                           torchrun / DistributedDataParallel                  #
#################################################################################

def setup_distributed(device=None):
    """(rank, world_size, device). Under torchrun, joins the process group (NCCL on GPU,
    gloo on CPU); under plain python, a single process. device "cpu" keeps a GPU machine
    on the CPU; by default the GPU is used when there is one."""
    use_cuda = torch.cuda.is_available() and device != "cpu"
    rank, world_size, local_rank = 0, 1, 0
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if use_cuda else "gloo")
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        return rank, world_size, torch.device("cuda", local_rank)
    return rank, world_size, torch.device("cpu")


def barrier(world_size):
    if world_size > 1:
        dist.barrier()


def cleanup_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


def autocast(device):
    """bf16 autocast on CUDA, full precision on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def all_reduce_mean(value, world_size):
    """Mean of a float over ranks (for logging)."""
    if world_size == 1:
        return float(value)
    tensor = torch.tensor(float(value), device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(tensor)
    return tensor.item() / world_size


#################################################################################
#                                     EMA                                       #
#################################################################################

@torch.no_grad()
def update_ema(ema_model, model, decay):
    """ema <- decay * ema + (1 - decay) * model, for parameters and float buffers.
    lerp leaves a weight that did not change bit-for-bit unchanged."""
    ema_state = ema_model.state_dict()
    for name, value in model.state_dict().items():
        if value.dtype.is_floating_point:
            ema_state[name].lerp_(value, 1.0 - decay)
        else:
            ema_state[name].copy_(value)


def ema_decay(step, decay, warmup):
    """The EMA decay at a step: min(decay, (1 + step) / (warmup + step)), so that short runs
    are not dominated by the random initialisation; warmup 0 gives the plain decay."""
    if warmup <= 0:
        return decay
    return min(decay, (1 + step) / (warmup + step))


#################################################################################
#                           Checkpoints (atomic) and RNG                        #
#################################################################################

@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path beside `path` to write to; on success renames it over
    `path`, so a crash leaves the old file or the new one, never half of one. The
    temporary keeps the extension, for writers that choose the format by it."""
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    stem, extension = os.path.splitext(name)
    temporary = os.path.join(folder, f".{stem}.tmp{os.getpid()}{extension}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def save_checkpoint(state, path):
    with atomic_path(path) as temporary:
        torch.save(state, temporary)


def load_checkpoint(path, what="checkpoint"):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


def open_run(out, resume, world_size, batch_size, kind_check):
    """(checkpoint path, the run's checkpoint when resuming, else None). An existing run is
    never overwritten: without --resume it is an error. kind_check(checkpoint) returns an
    error text when the file belongs to another kind of run. Exact resume also needs the
    same processes and per-process batch: the data order and the per-rank RNG depend on both."""
    path = os.path.join(out, "checkpoint.pt")
    if not os.path.exists(path):
        return path, None
    if not resume:
        raise SystemExit(f"error: {path} exists; pass --resume to continue that run or choose another --out "
                         f"(nothing was overwritten)")
    checkpoint = load_checkpoint(path)
    problem = kind_check(checkpoint)
    if problem:
        raise SystemExit(f"error: {path} {problem}")
    saved = (len(checkpoint["rng"]), checkpoint["args"]["batch_size"])
    if saved != (world_size, batch_size):
        raise SystemExit(f"error: {path} was written by {saved[0]} process(es) with --batch-size {saved[1]}; "
                         f"resume it with the same (torchrun --nproc_per_node={saved[0]} ... --batch-size {saved[1]})")
    return path, checkpoint


def gather_rng_states(world_size):
    """Every rank's RNG state, in rank order (all ranks must call it)."""
    if world_size == 1:
        return [rng_state()]
    states = [None] * world_size
    dist.all_gather_object(states, rng_state())
    return states


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
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with atomic_path(path) as temporary, open(temporary, "w") as f:
        f.writelines(kept)


def log_metrics(path, record):
    """Appends one JSON line to the metrics file."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def save_grid(images, path, nrow):
    """Saves images in [-1, 1] (N, 3, H, W) as one PNG grid, written atomically."""
    with atomic_path(path) as temporary:
        save_image((images.float().clamp(-1, 1) + 1) / 2, temporary, nrow=nrow, padding=2)


def unwrap(model):
    """The module inside DistributedDataParallel and/or torch.compile."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)
