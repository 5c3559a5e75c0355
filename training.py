"""
The pieces of a training step that the tokenizer and diffusion scripts share: the
torchrun/DDP setup, bf16 autocast, gradient clipping and the finiteness check, the one EMA,
and PSNR. What only keeps long runs alive (locks, signals, atomic writes, resume checks,
the metrics file) is in harness.py, which a first reading can skip.
"""
import contextlib
import datetime
import os

import torch
import torch.distributed as dist


#################################################################################
#                           torchrun / DistributedDataParallel                  #
#################################################################################

def setup_distributed(device=None, timeout=None):
    """(rank, world_size, device). Under torchrun, joins the process group (NCCL on GPU,
    gloo on CPU); under plain python, a single process. device "cpu" keeps a GPU machine
    on the CPU; by default the GPU is used when there is one. timeout: seconds a collective
    may wait for the other ranks (None: torch's default, 10 minutes for NCCL)."""
    use_cuda = torch.cuda.is_available() and device != "cpu"
    rank, world_size, local_rank = 0, 1, 0
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if use_cuda else "gloo",
                                timeout=None if timeout is None else datetime.timedelta(seconds=timeout))
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        return rank, world_size, torch.device("cuda", local_rank)
    return rank, world_size, torch.device("cpu")


def barrier(world_size):
    if world_size > 1:
        dist.barrier()


def gradient_sync(model, last):
    """Where a step's micro-batch runs (forward and backward) under --grad-accum: DDP
    all-reduces the gradients only on the last one; the inner ones accumulate locally
    (no_sync), so accumulation costs one all-reduce per optimiser step."""
    if last or not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()


def cleanup_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


def unwrap(model):
    """The module inside DistributedDataParallel and/or torch.compile."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def autocast(device):
    """bf16 autocast on CUDA, full precision on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def all_reduce_mean(values, world_size):
    """Mean over ranks of a float or of a 1-d tensor of floats (one collective call)."""
    tensor = torch.as_tensor(values, dtype=torch.float64)
    if world_size > 1:
        tensor = tensor.to("cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(tensor)
        tensor = tensor / world_size
    return tensor.cpu().tolist()


def clip_gradients(parameters, max_norm):
    """Clips the total gradient norm to max_norm and returns the norm before clipping.
    max_norm 0 means no clipping (torch would zero every gradient)."""
    return torch.nn.utils.clip_grad_norm_(parameters, max_norm if max_norm > 0 else float("inf"))


def all_finite(values, world_size):
    """True when every value is finite on every rank: one decision for all ranks, so that a
    rank whose own loss is inf (with finite gradients) skips the step with the others."""
    finite = float(all(bool(torch.isfinite(torch.as_tensor(v)).all()) for v in values))
    return all_reduce_mean(finite, world_size) == 1


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
#                              Metrics a step logs                              #
#################################################################################

def psnr(x, y, data_range=1.0):
    """Per-image PSNR (N,) of float images (N, C, H, W): logged by train_tokenizer.py and
    reported by evaluate.py."""
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range ** 2 / mse)
