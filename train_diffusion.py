r"""
Trains LightningDiT, the class-conditional flow model, on the latents of a trained
AlignTok tokenizer (arXiv 2509.25162).

CPU demo on the embedded data set (the --model default, LightningDiT-B/1, is the paper's
smallest size; the demo shrinks it with the override flags):

    python train_diffusion.py --tokenizer runs/demo/stage3/checkpoint.pt --out runs/demo/dit \
        --depth 4 --hidden-size 128 --num-heads 2 --lr 1e-3 --ema-decay 0.999 --ema-warmup 10

ImageNet 256, LightningDiT-XL/1 for 64 epochs (80K steps at a global batch of 1024 on 8
GPUs); --qk-norm for long runs (800 epochs), whose loss otherwise turns NaN after ~140K steps:

    torchrun --nproc_per_node=8 train_diffusion.py --tokenizer runs/stage3/checkpoint.pt \
        --data /data/imagenet/train --model LightningDiT-XL/1 --batch-size 128 --steps 80000 \
        --qk-norm --compile --workers 8 --out runs/dit-xl

The first run encodes the data set once, each image and its horizontal flip, into a
latent cache (latents.py); later runs with the same tokenizer and data reuse it.
The run folder gets checkpoint.pt (written atomically; --resume continues it exactly),
metrics.jsonl and samples.png (EMA model, one row per class).
"""
import argparse
import copy
import os
import sys

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from data import build_dataset, step_loader
from dit import DIT_NAMES, create_model, drop_labels, flow_loss, sample
import harness
from latents import LatentPairs, cache_latents
from training import (all_finite, autocast, cleanup_distributed, clip_gradients, ema_decay, gradient_sync,
                      setup_distributed, unwrap, update_ema)
from vae import load_tokenizer_or_vae
from weights import load_state_dict_strict, weights_hash


#################################################################################
#                                    Helpers                                    #
#################################################################################

def build_model(args, latent_shape, num_classes):
    """The named LightningDiT with the command line's overrides, sized to the latents."""
    channels, h, w = latent_shape
    overrides = {k: v for k, v in dict(depth=args.depth, hidden_size=args.hidden_size,
                                       num_heads=args.num_heads).items() if v is not None}
    try:
        return create_model(args.model, input_size=h, in_channels=channels, num_classes=num_classes,
                            qk_norm=args.qk_norm, **overrides)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None


@torch.no_grad()
def save_samples(ema, tokenizer, noise, labels, args, path):
    """One row per class of EMA samples from fixed noise, decoded by the tokenizer."""
    device = noise.device
    with autocast(device):
        z = sample(ema, noise, labels, steps=args.sample_steps, cfg_scale=args.sample_cfg_scale,
                   cfg_interval=args.sample_cfg_interval)
        images = tokenizer.decode(tokenizer.denormalize(z.float()))
    harness.save_grid(images, path, nrow=args.sample_columns)


def accumulate_gradients(train_model, x, labels, args):
    """Forward and backward of one optimiser step's --grad-accum micro-batches, each loss
    divided by their number, so that the summed gradients are those of the mean loss over
    the whole batch; DDP all-reduces once, after the last. Returns the mean loss and the
    mean of its parts."""
    loss, parts = 0.0, {}
    for k, (x_k, labels_k) in enumerate(zip(x.chunk(args.grad_accum), labels.chunk(args.grad_accum))):
        with gradient_sync(train_model, last=k == args.grad_accum - 1):
            with autocast(x.device):
                loss_k, parts_k = flow_loss(train_model, x_k, labels_k, args.cosine_weight)
            (loss_k / args.grad_accum).backward()
        loss = loss + loss_k.detach() / args.grad_accum
        parts = {name: parts.get(name, 0.0) + value / args.grad_accum for name, value in parts_k.items()}
    return loss, parts


#################################################################################
#                                 Training loop                                 #
#################################################################################

def main(args):
    # ---- setup -----------------------------------------------------------------
    stop = harness.StopSignal()
    rank, world_size, device = setup_distributed()
    checkpoint_path, resume = harness.open_run(args, rank, world_size, lambda checkpoint:
                                       None if {"model_config", "latents"} <= set(checkpoint) else
                                       "is not a train_diffusion.py checkpoint; choose another --out")
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    tokenizer = harness.read_or_exit(lambda path: load_tokenizer_or_vae(path, finished_only=True), args.tokenizer,
                                     "--tokenizer").to(device)
    # What sample.py checks before it decodes: the file at the stored path may be retrained later.
    tokenizer_hash = weights_hash(tokenizer)

    # ---- data: the latent cache ---------------------------------------------------
    dataset = build_dataset(args.data, tokenizer.image_size, "train", args.num_images, args.seed)
    num_classes = len(dataset.classes)
    cache_path, cache_key = cache_latents(tokenizer, dataset, args, rank, world_size, device, stop=stop,
                                          expected_key=None if resume is None else resume["latents"])
    latents = LatentPairs(cache_path, dataset.targets)
    latent_shape = (tokenizer.latent_mean.numel(),) + tuple(tokenizer.grid_size)   # (C, h, w)
    if rank == 0 and bool((tokenizer.latent_mean == 0).all() and (tokenizer.latent_std == 1).all()):
        print("note: the tokenizer holds no latent statistics (mean 0, std 1: a checkpoint saved before its "
              "stage ended?), "
              "so the DiT trains on raw latents")

    # ---- model -------------------------------------------------------------------
    torch.manual_seed(args.seed + rank)            # after the cache, whose building draws from the RNG
    model = build_model(args, latent_shape, num_classes).to(device)
    model.grad_checkpoint = args.grad_checkpoint
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                                  betas=(args.beta1, args.beta2), weight_decay=args.weight_decay)
    step, skipped = 0, 0
    if resume is not None:
        if resume.get("model_config") != model.config:
            raise SystemExit(f"error: {checkpoint_path} holds another model ({resume.get('model_config')}); "
                             f"resume with the run's own --model and override flags (they are in its args)")
        load_state_dict_strict(model, resume["model"], checkpoint_path)
        load_state_dict_strict(ema, resume["ema"], checkpoint_path)
        optimizer.load_state_dict(resume["optimizer"])
        step, skipped = resume["step"], resume["skipped"]
    train_model = torch.compile(model, backend=args.compile_backend) if args.compile else model
    if world_size > 1:
        train_model = DDP(train_model, device_ids=[device.index] if device.type == "cuda" else None)
        if resume is None:   # DDP gave every rank rank 0's initial weights (ranks seed differently); so must the EMA
            ema.load_state_dict(model.state_dict())
    # Each step loads this rank's whole share of the global batch, so that the micro-batches
    # of --grad-accum are the same latents, flips and dropped labels as one larger batch.
    loader = step_loader(latents, args.batch_size * args.grad_accum, rank, world_size, args.seed, step, args.workers,
                         device)
    # Preview: fixed noise from its own generator, so previews never move the training RNG.
    rows = min(10, num_classes)
    preview_labels = torch.linspace(0, num_classes - 1, rows).round().long().repeat_interleave(args.sample_columns)
    preview_noise = torch.randn((len(preview_labels),) + latent_shape,
                                generator=torch.Generator().manual_seed(args.seed))
    preview_labels, preview_noise = preview_labels.to(device), preview_noise.to(device)
    if rank == 0:   # the lock is held until the process ends (open_run took it to resume)
        harness.lock_folder(args.out, new_file=checkpoint_path if resume is None else None)
        harness.check_free_space(args.out, harness.checkpoint_bytes(model), "a checkpoint")
        harness.trim_metrics(metrics_path, step)
    if resume is not None:   # last: building the loader above draws its base seed from the RNG
        harness.set_rng_state(resume["rng"][rank])

    # ---- checkpoint --------------------------------------------------------------
    def write_checkpoint(finished=False):
        gathered = harness.gather_rng_states(world_size, model, ema)
        if rank == 0:
            harness.save_checkpoint({"model_config": unwrap(model).config, "model": unwrap(model).state_dict(),
                                     "ema": ema.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                                     "args": dict(vars(args), tokenizer=os.path.abspath(args.tokenizer)),
                                     "rng": gathered, "skipped": skipped, "num_classes": num_classes,
                                     "latents": cache_key, "tokenizer_hash": tokenizer_hash, "finished": finished},
                                    checkpoint_path)

    # ---- loop --------------------------------------------------------------------
    progress = tqdm(total=args.steps, initial=step, desc="LightningDiT", disable=rank != 0, dynamic_ncols=True)
    log, record, bad_in_a_row = harness.MetricsLog(metrics_path, rank, world_size), {}, 0
    while step < args.steps:
        pairs, labels = next(loader)
        pairs, labels = pairs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        flip = torch.rand(pairs.shape[0], device=device) < 0.5        # the flipped image's latent
        x = tokenizer.normalize(torch.where(flip.view(-1, 1, 1, 1), pairs[:, 1], pairs[:, 0]))  # (N, C, h, w)
        labels = drop_labels(labels, args.label_dropout, num_classes)
        optimizer.zero_grad(set_to_none=True)
        loss, parts = accumulate_gradients(train_model, x, labels, args)
        grad_norm = clip_gradients(model.parameters(), args.grad_clip)
        if all_finite([loss, grad_norm], world_size):
            optimizer.step()
            update_ema(ema, unwrap(model), ema_decay(step, args.ema_decay, args.ema_warmup))
            log.add(dict(parts, loss=loss, grad_norm=grad_norm))
            bad_in_a_row = 0
        else:   # no update, the batch is spent; a run of them means the weights are beyond repair
            skipped, bad_in_a_row = skipped + 1, bad_in_a_row + 1
            log.skip()
            harness.stop_if_beyond_repair(bad_in_a_row, args.max_bad_steps, step + 1, checkpoint_path,
                                  "resume it with a lower --lr, or with --qk-norm from the start")
        step += 1
        progress.update(1)

        if step % args.log_every == 0 or step == args.steps:
            record = log.write(step=step, skipped=skipped)
            progress.set_postfix(loss=record.get("loss"), skipped=skipped)
        if rank == 0 and (step % args.sample_every == 0 or step == args.steps):
            save_samples(ema, tokenizer, preview_noise, preview_labels, args, os.path.join(args.out, "samples.png"))
        if step % args.ckpt_every == 0 and step < args.steps:
            write_checkpoint()
        if stop.requested(world_size):
            break
    progress.close()
    # Last, after the samples: a run is finished when its checkpoint says so.
    write_checkpoint(finished=step >= args.steps)
    if rank == 0 and step < args.steps:
        stop.report(step, checkpoint_path)
    elif rank == 0:
        print(f"LightningDiT done: {step} steps, loss {record.get('loss')}, {skipped} skipped (non-finite); "
              f"checkpoint {checkpoint_path}")
    cleanup_distributed()
    return None if step >= args.steps else harness.STOPPED


#################################################################################
#                                   Arguments                                   #
#################################################################################

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    run = parser.add_argument_group("run")
    run.add_argument("--tokenizer", required=True, type=harness.input_path(),
                     help="tokenizer checkpoint.pt of train_tokenizer.py stage 1-3, or a diffusers "
                          "AutoencoderKL folder (vae.py; f8 VAEs want a /2 --model)")
    run.add_argument("--out", required=True, help="run folder for checkpoint.pt, metrics.jsonl and samples.png")
    run.add_argument("--resume", action="store_true",
                     help="continue the run in --out from its checkpoint (starts fresh if it has none)")
    run.add_argument("--steps", type=harness.positive_int, default=3000,
                     help="total steps (the CPU demo: 3000; ImageNet, 64 epochs at "
                          "a global batch of 1024: 80000)")
    run.add_argument("--seed", type=int, default=0, help="training seed; also the synthetic data set's seed")
    data = parser.add_argument_group("data and latent cache")
    data.add_argument("--data", default="synthetic", type=harness.input_path("synthetic"),
                      help="'synthetic' (embedded) or an ImageFolder path; "
                           "the image size is the tokenizer's")
    data.add_argument("--num-images", type=harness.positive_int, default=10000,
                      help="size of the synthetic training set")
    data.add_argument("--batch-size", type=harness.positive_int, default=32,
                      help="per process and micro-batch; the global batch is this x processes x --grad-accum "
                           "(ImageNet: 128 on each of 8 GPUs)")
    data.add_argument("--grad-accum", type=harness.positive_int, default=1,
                      help="micro-batches per optimiser step, gradients accumulated (fewer GPUs, same recipe)")
    data.add_argument("--workers", type=harness.non_negative_int, default=0, help="data loader worker processes")
    data.add_argument("--cache-dir", help="latent cache folder (default <out>/latents); may be shared by runs")
    data.add_argument("--cache-dtype", default="float16", choices=["float16", "float32"],
                      help="storage type of the cached latents (float16 halves the disk: 42 GB for ImageNet)")
    data.add_argument("--wait-timeout", type=harness.positive_float, default=3600,
                      help="seconds a rank waits on the file system for the other ranks' latent cache parts "
                           "before it gives up (our choice: 3600; it also stops when a rank stopped by a signal "
                           "or the launcher is gone)")
    data.add_argument("--cache-batch-size", type=harness.positive_int, default=64,
                      help="images per batch when encoding the cache")
    model = parser.add_argument_group("model (in_channels and input_size come from the latents, "
                                      "num_classes from the data set)")
    model.add_argument("--model", default="LightningDiT-B/1", choices=DIT_NAMES, help="size (ImageNet: XL/1)")
    model.add_argument("--depth", type=harness.positive_int, help="override: number of blocks")
    model.add_argument("--hidden-size", type=harness.positive_int, help="override: width")
    model.add_argument("--num-heads", type=harness.positive_int,
                       help="override: attention heads (head dim divisible by 4)")
    model.add_argument("--qk-norm", action="store_true", help="RMSNorm on q and k (long runs: avoids NaN losses)")
    optim = parser.add_argument_group("optimisation (LightningDiT's ImageNet recipe)")
    optim.add_argument("--lr", type=harness.non_negative_float, default=2e-4, help="constant learning rate")
    optim.add_argument("--beta1", type=harness.below_one, default=0.9)
    optim.add_argument("--beta2", type=harness.below_one, default=0.95)
    optim.add_argument("--weight-decay", type=harness.non_negative_float, default=0.0)
    optim.add_argument("--grad-clip", type=harness.non_negative_float, default=1.0,
                       help="max gradient norm; 0 = no clipping")
    optim.add_argument("--ema-decay", type=harness.unit_interval, default=0.9999)
    optim.add_argument("--ema-warmup", type=harness.non_negative_int, default=0,
                       help="decay is min(ema_decay, (1+step)/(warmup+step)); 0 = the plain decay (recipe), "
                            "short CPU runs want ~10")
    optim.add_argument("--label-dropout", type=harness.unit_interval, default=0.1,
                       help="probability of the null class (for CFG)")
    optim.add_argument("--cosine-weight", type=harness.non_negative_float, default=1.0,
                       help="weight of the velocity cosine term")
    optim.add_argument("--compile", action="store_true", help="torch.compile the model")
    optim.add_argument("--compile-backend", default="inductor",
                       help="torch.compile backend (aot_eager compiles in seconds, for CPU rehearsals)")
    optim.add_argument("--grad-checkpoint", action="store_true",
                       help="activation checkpointing of the DiT blocks: less memory, one more forward")
    optim.add_argument("--max-bad-steps", type=harness.positive_int, default=20,
                       help="stop after this many non-finite steps in a row (each is skipped and counted; "
                            "our choice)")
    logging = parser.add_argument_group("logging, previews and checkpoints")
    logging.add_argument("--log-every", type=harness.positive_int, default=100)
    logging.add_argument("--ckpt-every", type=harness.positive_int, default=1000)
    logging.add_argument("--sample-every", type=harness.positive_int, default=1000,
                         help="steps between samples.png previews")
    logging.add_argument("--sample-columns", type=harness.positive_int, default=8,
                         help="samples per class row of the preview")
    logging.add_argument("--sample-steps", type=harness.positive_int, default=50, help="Euler steps of the preview")
    logging.add_argument("--sample-cfg-scale", type=harness.non_negative_float, default=1.0,
                         help="guidance of the preview (1 = none)")
    logging.add_argument("--sample-cfg-interval", type=harness.unit_interval, default=0.1,
                         help="guidance only where t >= this")
    args = parser.parse_args(argv)
    return args


if __name__ == "__main__":
    sys.exit(main(parse_args()))
