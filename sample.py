r"""
Samples a trained LightningDiT and decodes the samples with its AlignTok tokenizer.

Class-balanced sample batch for FID (ADM's npz layout: arr_0 uint8 (N, H, W, 3) images,
arr_1 int64 labels; plus `settings`, the JSON of what the samples came from), sharded over
torchrun ranks and resumable shard by shard:

    torchrun --nproc_per_node=8 sample.py --ckpt runs/in1k/dit-xl/checkpoint.pt \
        --num-samples 50000 --steps 250 --cfg-scale 1.5 --cfg-interval 0.1 --out samples.npz

A PNG grid of chosen classes, one row per class (as DiT's sample.py):

    python sample.py --ckpt runs/demo/dit/checkpoint.pt --grid grid.png --classes 0 3 7 --per-class 8

The sampler's path, the clean image predicted at several t, one row per class:

    python sample.py --ckpt runs/demo/dit/checkpoint.pt --trajectory trajectory.png --classes 0 3 7

Sample i is drawn from noise seeded by (--seed, i) alone and has label i mod num_classes,
so any number of ranks, any batch size and any interruption give the same images. The
shards are keyed to the DiT and tokenizer weights (content hashes) and the sampling flags:
a changed checkpoint or flag is refused instead of reusing stale shards.
"""
import argparse
import json
import math
import os
import sys
import zipfile

import numpy as np
import torch
import torch.distributed as dist

import dit
import harness
from training import cleanup_distributed, setup_distributed
from vae import load_tokenizer_or_vae
from weights import weights_hash


#################################################################################
#                                   Sampling                                    #
#################################################################################

def sample_noise(seed, indices, shape):
    """Noise of sample i depends only on (seed, i): any sharding, batch size or resume
    gives the same images. torch's CPU generator keeps only the low 32 bits of a seed, so
    (seed, i) is folded into 32 bits: i plus a per-seed offset (a multiple of 2^32 / golden
    ratio), distinct for every i of one seed and far apart between seeds. Seed 0 gives i."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed((seed * 0x9E3779B1 + i) % 2 ** 32))
                        for i in indices])


def to_uint8(images):
    """Float (N, 3, H, W) in [-1, 1] -> uint8 (N, H, W, 3) numpy, rounded as DiT's sampler."""
    images = torch.clamp(127.5 * images.float() + 128.0, 0, 255).to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu().numpy()


def set_precision(precision):
    """TF32 on CUDA exactly when asked for: fp32 and bf16 keep float32 matmuls and
    convolutions exact (bf16 autocasts only what autocast covers, see sample_images)."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"


@torch.no_grad()
def sample_images(model, tok, indices, args, device, labels=None, trajectory=None):
    """Decoded samples (n, 3, H, W) in [-1, 1] of the given sample indices, and their labels
    (n,): class-balanced (i mod num_classes) unless labels are given. trajectory: a list that
    receives the decoded clean-image predictions (t, (n, 3, H, W)) along the sampler's path."""
    config = model.config
    shape = (config["in_channels"], config["input_size"], config["input_size"])
    if labels is None:
        labels = torch.tensor([i % config["num_classes"] for i in indices])
    noise = sample_noise(args.seed, indices, shape).to(device)                # (n, C, h, w)
    path = [] if trajectory is not None else None
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
        x = dit.sample(model, noise, labels.to(device), steps=args.steps, method=args.method,
                       cfg_scale=args.cfg_scale, cfg_interval=args.cfg_interval, shift=args.shift,
                       cfg_channels=args.cfg_channels, trajectory=path)
        images = tok.decode(tok.denormalize(x))
        if trajectory is not None:
            trajectory += [(t, tok.decode(tok.denormalize(x_hat)).float()) for t, x_hat in path[:-1]]
            trajectory.append((1.0, images.float()))
    return images.float(), labels


#################################################################################
#                            Shards of the sample batch                         #
#################################################################################

def shard_folder(out):
    return os.path.splitext(out)[0] + "_shards"


def sample_settings(model, checkpoint, tok_hash, args):
    """What the samples depend on: the weights actually used (content hashes of the DiT's EMA
    and of the tokenizer, not their paths, since train_diffusion.py rewrites one checkpoint.pt
    as it trains), the checkpoint's step, and every flag that changes an image. Not the batch
    size or the number of ranks, which change at most the float rounding."""
    return dict(dit=weights_hash(model), dit_step=checkpoint.get("step"), tokenizer=tok_hash,
                num=args.num, shard_size=args.shard_size, seed=args.seed, steps=args.steps, method=args.method,
                cfg_scale=args.cfg_scale, cfg_interval=args.cfg_interval, shift=args.shift,
                cfg_channels=args.cfg_channels, precision=args.precision)


def plan_shards(folder, settings, shard_paths, rank, world_size):
    """This rank's share of the missing shards. Rank 0 checks the folder's settings (shards
    are only reused when made from the same weights with the same settings) and lists the
    missing shards once for all ranks; they are dealt round-robin, so the ranks' work differs
    by at most one shard on a fresh run and on a resumed one alike."""
    path = os.path.join(folder, "settings.json")
    plan = [None, None]
    if rank == 0:
        harness.lock_folder(folder, "--out")   # two jobs writing one folder's shards would interleave them
        if os.path.exists(os.path.join(folder, "stopped")):      # left by an interrupted run
            os.remove(os.path.join(folder, "stopped"))
        if not os.path.isfile(path):
            harness.save_json(path, settings)
        with open(path) as f:
            plan = [json.load(f), [s for s, p in enumerate(shard_paths) if not os.path.isfile(p)]]
    if world_size > 1:
        dist.broadcast_object_list(plan, src=0)
    saved, missing = plan
    if saved != settings:
        changed = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
        raise SystemExit(f"error: {folder} holds shards made with other weights or settings ({', '.join(changed)}); "
                         f"rerun with the same checkpoint and flags, or delete the folder to start over")
    return missing[rank::world_size]


def merge_shards(shard_paths, out, settings):
    """Writes the npz (ADM's arr_0, arr_1, plus our settings as JSON) straight from the
    shards into the zip, one shard in memory at a time: a 50K 256 px batch is 10 GB, and
    loading every shard and concatenating them held it twice. Stored uncompressed, so
    np.load, ADM's evaluator and evaluate.iter_npz_array all read it."""
    labels = []
    for path in shard_paths:
        with np.load(path) as shard:
            labels.append(shard["arr_1"])
    with np.load(shard_paths[0]) as shard:
        image_shape = shard["arr_0"].shape[1:]
    labels = np.concatenate(labels)
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": (len(labels), *image_shape)}
    with harness.atomic_path(out) as temporary:
        with zipfile.ZipFile(temporary, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            with archive.open("arr_0.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(f, header)
                for path in shard_paths:
                    with np.load(path) as shard:
                        f.write(np.ascontiguousarray(shard["arr_0"]).data)
            for name, array in (("arr_1", labels), ("settings", np.array(json.dumps(settings, sort_keys=True)))):
                with archive.open(f"{name}.npy", "w") as f:
                    np.lib.format.write_array(f, array)


def write_sample_batch(model, tok, settings, args, rank, world_size, device, stop):
    """The class-balanced npz of --num-samples samples, made shard by shard. Only a start-up
    collective joins the ranks; rank 0 then waits for the others' shards on the file system
    (harness.wait_for_files), so no wait can time out however long a shard takes."""
    if rank == 0 and args.num % model.config["num_classes"]:
        print(f"--num-samples {args.num} is not a multiple of {model.config['num_classes']} classes: "
              f"class counts will differ by one")
    folder = shard_folder(args.out)
    num_shards = math.ceil(args.num / args.shard_size)
    shard_paths = [os.path.join(folder, f"shard_{s:06d}.npz") for s in range(num_shards)]
    stop_mark = os.path.join(folder, "stopped")     # left by a rank that got a signal: rank 0 stops waiting
    for s in plan_shards(folder, settings, shard_paths, rank, world_size):
        indices = list(range(s * args.shard_size, min((s + 1) * args.shard_size, args.num)))
        parts = [sample_images(model, tok, indices[b:b + args.batch_size], args, device)
                 for b in range(0, len(indices), args.batch_size)]
        harness.save_npz(shard_paths[s], arr_0=np.concatenate([to_uint8(p[0]) for p in parts]),
                 arr_1=np.concatenate([p[1].numpy() for p in parts]))
        print(f"[rank {rank}] shard {s + 1}/{num_shards} done")
        if stop.name is not None:   # ranks share no step here: each stops after its own shard
            open(stop_mark, "w").close()
            done = sum(os.path.isfile(p) for p in shard_paths)
            print(f"stopped by {stop.name}: {done} of {num_shards} shards kept in {folder}; "
                  f"run the same command again to make the rest", flush=True)
            return harness.STOPPED
    if rank == 0:
        harness.wait_for_files(shard_paths, "sample shards", stop_mark, args.wait_timeout, stop)
        merge_shards(shard_paths, args.out, settings)
        print(f"wrote {args.num} samples to {args.out} (shards kept in {folder})")


def chosen_classes(model, args, default):
    classes = args.classes if args.classes else list(range(min(default, model.config["num_classes"])))
    bad = [c for c in classes if not 0 <= c < model.config["num_classes"]]
    if bad:
        raise SystemExit(f"error: --classes {bad} outside 0..{model.config['num_classes'] - 1}")
    return classes


def write_grid(model, tok, args, device):
    """A PNG with one row of --per-class samples for each of --classes."""
    classes = chosen_classes(model, args, 10)
    labels = torch.tensor(classes).repeat_interleave(args.per_class)
    images, _ = sample_images(model, tok, list(range(len(labels))), args, device, labels=labels)
    harness.save_grid(images, args.grid, nrow=args.per_class)
    print(f"wrote {len(classes)} classes x {args.per_class} samples to {args.grid}")


def write_trajectory(model, tok, args, device):
    """A PNG of the sampler's path, one row per class of --classes (sample i, as in --grid
    with --per-class 1): the decoded clean image predicted from the current state and
    velocity at --trajectory-columns points of the time grid, from t = 0 (noise) to t = 1
    (the sample, the last column)."""
    labels = torch.tensor(chosen_classes(model, args, 4))
    path = []
    sample_images(model, tok, list(range(len(labels))), args, device, labels=labels, trajectory=path)
    picks = np.linspace(0, len(path) - 1, min(args.trajectory_columns, len(path))).round().astype(int)
    images = torch.stack([path[k][1] for k in picks], dim=1)                   # (n, columns, 3, H, W)
    harness.save_grid(images.flatten(0, 1), args.trajectory, nrow=len(picks))
    print(f"wrote {len(labels)} samples x {len(picks)} predictions at t = "
          f"{', '.join(f'{path[k][0]:.3g}' for k in picks)} to {args.trajectory}")


#################################################################################
#                                     Main                                      #
#################################################################################

def main(argv=None):
    args = parse_args(argv)
    picture = "--grid" if args.grid else "--trajectory" if args.trajectory else None
    harness.check_writable(args.grid or args.trajectory or args.out, picture or "--out")
    stop = harness.StopSignal()
    rank, world_size, device = setup_distributed(args.device, timeout=args.dist_timeout)
    set_precision(args.precision)
    model, checkpoint = harness.read_or_exit(lambda path: dit.load_dit(path, use_ema=True), args.ckpt, "--ckpt")
    tok_path = args.tokenizer or checkpoint.get("args", {}).get("tokenizer")
    if not tok_path:
        raise SystemExit(f"error: {args.ckpt} names no tokenizer checkpoint; pass --tokenizer PATH")
    tok = harness.read_or_exit(load_tokenizer_or_vae, tok_path,
                               "--tokenizer" if args.tokenizer else f"{args.ckpt}'s tokenizer")
    tok_hash = weights_hash(tok)
    if checkpoint.get("tokenizer_hash", tok_hash) != tok_hash:   # checkpoints before the hash was kept: unchecked
        raise SystemExit(f"error: the tokenizer {tok_path} is not the one {args.ckpt} was trained with (its weights "
                         f"hash {tok_hash[:12]}, the DiT's checkpoint records {checkpoint['tokenizer_hash'][:12]}); "
                         f"pass --tokenizer with the tokenizer the DiT was trained on")
    if args.cfg_channels is not None and args.cfg_channels > model.config["in_channels"]:
        raise SystemExit(f"error: --cfg-channels {args.cfg_channels} exceeds the model's {model.config['in_channels']} "
                         f"latent channels; pass at most that, or leave it out to guide every channel")
    status = None
    if picture:
        if rank == 0:
            (write_grid if args.grid else write_trajectory)(model.to(device), tok.to(device), args, device)
    else:
        settings = sample_settings(model, checkpoint, tok_hash, args)
        status = write_sample_batch(model.to(device), tok.to(device), settings, args, rank, world_size, device, stop)
    cleanup_distributed()
    return status


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, type=harness.input_path(),
                        help="train_diffusion.py checkpoint (its EMA weights are used)")
    parser.add_argument("--tokenizer", default=None, type=harness.input_path(),
                        help="tokenizer checkpoint or diffusers AutoencoderKL folder (default: the DiT checkpoint's)")
    parser.add_argument("--out", help="the sample batch npz (ADM's layout)")
    parser.add_argument("--grid", help="instead of --out: a PNG grid, one row per class of --classes")
    parser.add_argument("--trajectory", help="instead of --out: a PNG of the decoded clean-image prediction along "
                                             "the sampler's path, one row per class of --classes (default: the "
                                             "first 4), columns from t=0 (noise) to t=1 (the sample)")
    parser.add_argument("--trajectory-columns", type=harness.positive_int, default=6,
                        help="points of the time grid shown by --trajectory, evenly spaced, the first and last "
                             "included (our choice: 6)")
    parser.add_argument("--classes", type=int, nargs="+",
                        help="classes of the grid (default: the first 10) or of the trajectory")
    parser.add_argument("--per-class", type=harness.positive_int, default=8, help="samples per class row of the grid")
    parser.add_argument("--num-samples", "--num", dest="num", type=harness.positive_int, default=50000,
                        help="number of samples (50 per class for ImageNet); under torchrun spell it "
                             "--num-samples, since torchrun reads --num as its own --numa-binding")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=harness.positive_int, default=50, help="model evaluations per sample")
    parser.add_argument("--method", default="euler", choices=("euler", "heun"))
    parser.add_argument("--cfg-scale", type=harness.non_negative_float, default=1.0)
    parser.add_argument("--cfg-interval", type=harness.unit_interval, default=0.1,
                        help="guide only where the shifted t >= this (LightningDiT, 64 epochs: 0.1; 800: 0.125)")
    parser.add_argument("--shift", type=harness.positive_float, default=0.3, help="timestep shift s")
    parser.add_argument("--cfg-channels", type=harness.positive_int, default=None,
                        help="guide only the first N channels (3: released LightningDiT)")
    parser.add_argument("--shard-size", type=harness.positive_int, default=1000,
                        help="samples per resumable shard file")
    parser.add_argument("--batch-size", type=harness.positive_int, default=100, help="samples per network call")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "tf32", "bf16"),
                        help="sampling arithmetic: float32 with TF32 off, float32 with TF32 matmuls and "
                             "convolutions on GPU, or bfloat16 autocast (our choice: fp32, the exact one; "
                             "recorded with the samples)")
    parser.add_argument("--dist-timeout", type=harness.positive_float, default=600,
                        help="seconds a collective waits for the other ranks under torchrun; only the start-up "
                             "joins the ranks, the shards are awaited on the file system (our choice: NCCL's 600)")
    parser.add_argument("--wait-timeout", type=harness.positive_float, default=3600,
                        help="seconds a rank waits on the file system for the other ranks' shards before it gives up "
                             "(our choice: 3600; it also stops when a rank stopped by a signal or the launcher "
                             "is gone)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if not (args.out or args.grid or args.trajectory):
        parser.error("pass --out PATH for a sample batch npz, --grid PATH for a PNG grid or --trajectory PATH")
    return args


if __name__ == "__main__":
    sys.exit(main())
