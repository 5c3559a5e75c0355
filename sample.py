r"""
Samples a trained LightningDiT and decodes the samples with its AlignTok tokenizer.

Class-balanced sample batch for FID (ADM's npz layout: arr_0 uint8 (N, H, W, 3) images,
arr_1 int64 labels), sharded over torchrun ranks and resumable shard by shard:

    torchrun --nproc_per_node=8 sample.py --ckpt runs/in1k/dit-xl/checkpoint.pt \
        --num-samples 50000 --steps 250 --cfg-scale 1.5 --cfg-interval 0.1 --out samples.npz

A PNG grid of chosen classes, one row per class (as DiT's sample.py):

    python sample.py --ckpt runs/demo/dit/checkpoint.pt --grid grid.png --classes 0 3 7 --per-class 8

Sample i is drawn from noise seeded by (--seed, i) alone and has label i mod num_classes,
so any number of ranks, any batch size and any interruption give the same images.
"""
import argparse
import json
import math
import os

import numpy as np
import torch

import dit
from tokenizer import load_tokenizer
from training import barrier, cleanup_distributed, save_grid, save_json, save_npz, setup_distributed


#################################################################################
#                                   Sampling                                    #
#################################################################################

def sample_noise(seed, indices, shape):
    """Noise of sample i depends only on (seed, i): any sharding, batch size or resume
    gives the same images."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed((seed << 32) + i))
                        for i in indices])


def to_uint8(images):
    """Float (N, 3, H, W) in [-1, 1] -> uint8 (N, H, W, 3) numpy, rounded as DiT's sampler."""
    images = torch.clamp(127.5 * images + 128.0, 0, 255).to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def sample_images(model, tok, indices, args, device, labels=None):
    """Decoded samples (n, 3, H, W) in [-1, 1] of the given sample indices, and their labels
    (n,): class-balanced (i mod num_classes) unless labels are given."""
    config = model.config
    shape = (config["in_channels"], config["input_size"], config["input_size"])
    if labels is None:
        labels = torch.tensor([i % config["num_classes"] for i in indices])
    noise = sample_noise(args.seed, indices, shape).to(device)                # (n, C, h, w)
    x = dit.sample(model, noise, labels.to(device), steps=args.steps, method=args.method,
                   cfg_scale=args.cfg_scale, cfg_interval=args.cfg_interval, shift=args.shift,
                   cfg_channels=args.cfg_channels)
    return tok.decode(tok.denormalize(x)), labels


#################################################################################
#                            Shards of the sample batch                         #
#################################################################################

def shard_folder(out):
    return os.path.splitext(out)[0] + "_shards"


def check_shard_settings(folder, settings, rank, world_size):
    """Shards are only reused when made with the same settings."""
    path = os.path.join(folder, "settings.json")
    if rank == 0:
        os.makedirs(folder, exist_ok=True)
        if not os.path.isfile(path):
            save_json(path, settings)
    barrier(world_size)
    with open(path) as f:
        saved = json.load(f)
    if saved != settings:
        changed = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
        raise SystemExit(f"{folder} holds shards made with other settings ({', '.join(changed)}); "
                         f"rerun with the same flags, or delete the folder to start over")


def load_npz(path):
    with np.load(path) as f:
        return {key: f[key] for key in f.files}


def write_sample_batch(model, tok, tok_path, args, rank, world_size, device):
    """The class-balanced npz of --num-samples samples, made shard by shard."""
    if rank == 0 and args.num % model.config["num_classes"]:
        print(f"--num-samples {args.num} is not a multiple of {model.config['num_classes']} classes: "
              f"class counts will differ by one")
    settings = dict(ckpt=os.path.abspath(args.ckpt), tokenizer=os.path.abspath(tok_path), num=args.num,
                    shard_size=args.shard_size, seed=args.seed, steps=args.steps, method=args.method,
                    cfg_scale=args.cfg_scale, cfg_interval=args.cfg_interval, shift=args.shift,
                    cfg_channels=args.cfg_channels)
    folder = shard_folder(args.out)
    check_shard_settings(folder, settings, rank, world_size)
    num_shards = math.ceil(args.num / args.shard_size)
    shard_paths = [os.path.join(folder, f"shard_{s:06d}.npz") for s in range(num_shards)]
    for s in range(rank, num_shards, world_size):
        if os.path.isfile(shard_paths[s]):
            continue
        indices = list(range(s * args.shard_size, min((s + 1) * args.shard_size, args.num)))
        parts = [sample_images(model, tok, indices[b:b + args.batch_size], args, device)
                 for b in range(0, len(indices), args.batch_size)]
        save_npz(shard_paths[s], arr_0=np.concatenate([to_uint8(p[0]) for p in parts]),
                 arr_1=np.concatenate([p[1].numpy() for p in parts]))
        print(f"[rank {rank}] shard {s + 1}/{num_shards} done")
    barrier(world_size)
    if rank == 0:
        shards = [load_npz(p) for p in shard_paths]
        save_npz(args.out, arr_0=np.concatenate([s["arr_0"] for s in shards]),
                 arr_1=np.concatenate([s["arr_1"] for s in shards]))
        print(f"wrote {args.num} samples to {args.out} (shards kept in {folder})")
    barrier(world_size)


def write_grid(model, tok, args, device):
    """A PNG with one row of --per-class samples for each of --classes."""
    classes = args.classes if args.classes else list(range(min(10, model.config["num_classes"])))
    bad = [c for c in classes if not 0 <= c < model.config["num_classes"]]
    if bad:
        raise SystemExit(f"error: --classes {bad} outside 0..{model.config['num_classes'] - 1}")
    labels = torch.tensor(classes).repeat_interleave(args.per_class)
    images, _ = sample_images(model, tok, list(range(len(labels))), args, device, labels=labels)
    save_grid(images, args.grid, nrow=args.per_class)
    print(f"wrote {len(classes)} classes x {args.per_class} samples to {args.grid}")


#################################################################################
#                                     Main                                      #
#################################################################################

def main(argv=None):
    args = parse_args(argv)
    rank, world_size, device = setup_distributed(args.device)
    model, checkpoint = dit.load_dit(args.ckpt, use_ema=True)
    tok_path = args.tokenizer or checkpoint.get("args", {}).get("tokenizer")
    if not tok_path:
        raise SystemExit(f"{args.ckpt} names no tokenizer checkpoint; pass --tokenizer PATH")
    model, tok = model.to(device), load_tokenizer(tok_path).to(device)
    if args.grid:
        if rank == 0:
            write_grid(model, tok, args, device)
    else:
        write_sample_batch(model, tok, tok_path, args, rank, world_size, device)
    cleanup_distributed()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="train_diffusion.py checkpoint (its EMA weights are used)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer checkpoint (default: the DiT checkpoint's)")
    parser.add_argument("--out", help="the sample batch npz (ADM's layout)")
    parser.add_argument("--grid", help="instead of --out: a PNG grid, one row per class of --classes")
    parser.add_argument("--classes", type=int, nargs="+", help="classes of the grid (default: the first 10)")
    parser.add_argument("--per-class", type=int, default=8, help="samples per class row of the grid")
    parser.add_argument("--num-samples", "--num", dest="num", type=int, default=50000,
                        help="number of samples (50 per class for ImageNet); under torchrun spell it "
                             "--num-samples, since torchrun reads --num as its own --numa-binding")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=50, help="model evaluations per sample")
    parser.add_argument("--method", default="euler", choices=("euler", "heun"))
    parser.add_argument("--cfg-scale", type=float, default=1.0)
    parser.add_argument("--cfg-interval", type=float, default=0.1,
                        help="guide only where the shifted t >= this (LightningDiT, 64 epochs: 0.1; 800: 0.125)")
    parser.add_argument("--shift", type=float, default=0.3, help="timestep shift s")
    parser.add_argument("--cfg-channels", type=int, default=None,
                        help="guide only the first N channels (3: released LightningDiT)")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per resumable shard file")
    parser.add_argument("--batch-size", type=int, default=100, help="samples per network call")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if not (args.out or args.grid):
        parser.error("pass --out PATH for a sample batch npz or --grid PATH for a PNG grid")
    return args


if __name__ == "__main__":
    main()
