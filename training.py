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

def setup_distributed():
    """(rank, world_size, device). Under torchrun, joins the process group (NCCL on GPU,
    gloo on CPU); under plain python, a single process."""
    if "RANK" in os.environ:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    else:
        rank, world_size, local_rank = 0, 1, 0
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return rank, world_size, device


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

def save_checkpoint(state, path):
    """Writes to a temporary file beside `path`, then renames it over `path`: a crash
    leaves either the old checkpoint or the new one, never half of one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    temporary = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        torch.save(state, temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def load_checkpoint(path, what="checkpoint"):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


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

def log_metrics(path, record):
    """Appends one JSON line to the metrics file."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def save_grid(images, path, nrow):
    """Saves images in [-1, 1] (N, 3, H, W) as one PNG grid, written atomically."""
    temporary = path + ".tmp.png"
    save_image((images.float().clamp(-1, 1) + 1) / 2, temporary, nrow=nrow, padding=2)
    os.replace(temporary, path)


def unwrap(model):
    """The module inside DistributedDataParallel and/or torch.compile."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)
