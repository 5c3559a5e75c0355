r"""
Trains the stand-in for DINOv2 that the embedded demo aligns: a small encoder with exactly
DINOv2's architecture (our DINOv2 class), pretrained as a supervised classifier on the data
set's labels, so that a CPU run has an encoder that carries class semantics, as DINOv2 does.
Not part of the paper's method: with real DINOv2 weights, skip this script and pass the
official file to train_tokenizer.py --stage 1 --encoder-weights.

    python train_stand_in.py --out runs/demo/stage0 --steps 800 --lr 1e-3 --batch-size 64 \
        --encoder-depth 4 --encoder-dim 128 --encoder-heads 4 --encoder-patch 4 --encoder-native-size 32

Its checkpoint.pt (a "stage 0" checkpoint) feeds train_tokenizer.py --stage 1
--encoder-weights and, through its classifier, judges the demo's samples (evaluate.py
report --stand-in). Multi-GPU runs go through torchrun, as for the other scripts.
"""
import argparse
import copy
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from data import build_dataset, step_loader
import harness
from tokenizer import EncoderClassifier, load_dinov2
from training import all_finite, autocast, cleanup_distributed, clip_gradients, ema_decay, setup_distributed, update_ema


def build_classifier(args, num_classes):
    """A DINOv2-architecture encoder with a classifier head, from scratch."""
    overrides = {"depth": args.encoder_depth, "embed_dim": args.encoder_dim, "num_heads": args.encoder_heads,
                 "patch_size": args.encoder_patch, "img_size": args.encoder_native_size}
    # The throw-away encoder only resolves the architecture name; it also fixes the RNG
    # stream that the demo's published numbers were measured with.
    encoder_config = load_dinov2(args.encoder, **{k: v for k, v in overrides.items() if v is not None}).config
    model = EncoderClassifier(encoder_config, num_classes, args.encoder_size)
    model.encoder.mask_token.requires_grad_(False)   # unused outside DINOv2's own pretraining
    return model


def main(args):
    # ---- setup -----------------------------------------------------------------
    stop = harness.StopSignal()
    rank, world_size, device = setup_distributed()
    checkpoint_path, resume = harness.open_run(args, rank, world_size, lambda checkpoint: None if checkpoint.get(
        "stage") == 0 else f"is a stage-{checkpoint.get('stage')} tokenizer run, not a stand-in (stage 0) run")
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    torch.manual_seed(args.seed + rank)

    # ---- data and model ------------------------------------------------------------
    dataset = build_dataset(args.data, args.image_size, "train", args.num_images, args.seed)
    try:
        model = build_classifier(args, len(dataset.classes)).to(device)
    except ValueError as error:   # the constructors check that the sizes fit together
        raise SystemExit(f"error: the model flags do not fit together: {error}") from None
    model.encoder.grad_checkpoint = args.grad_checkpoint
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": params, "lr": args.lr}], betas=(args.beta1, args.beta2),
                                  weight_decay=args.weight_decay)
    step, skipped = 0, 0
    if resume is not None:
        for module, key in ((model, "model"), (ema, "ema"), (optimizer, "optimizer")):
            module.load_state_dict(resume[key])
        step, skipped = resume["step"], resume.get("skipped", 0)
    train_model = model
    if world_size > 1:
        train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        if resume is None:   # DDP gave every rank rank 0's initial weights (ranks seed differently); so must the EMA
            ema.load_state_dict(model.state_dict())
    loader = step_loader(dataset, args.batch_size, rank, world_size, args.seed, step, args.workers, device,
                         args.max_bad_images, known_bad=[] if resume is None else resume.get("bad_images", []))
    if rank == 0:   # the lock is held until the process ends (open_run took it to resume)
        harness.lock_folder(args.out, new_file=checkpoint_path if resume is None else None)
        harness.check_free_space(args.out, harness.checkpoint_bytes(model), "a checkpoint")
        harness.trim_metrics(metrics_path, step)
    if resume is not None:  # last: building the loader iterator draws from the global RNG
        harness.set_rng_state(resume["rng"][rank])

    # ---- checkpoint --------------------------------------------------------------
    def write_checkpoint(finished=False):
        states, bad_images = harness.gather_rng_states(world_size, model, ema), loader.bad_images(world_size)
        if rank == 0:
            harness.save_checkpoint({"stage": 0, "step": step, "skipped": skipped, "args": vars(args),
                                     "stand_in_config": model.config, "model": model.state_dict(),
                                     "ema": ema.state_dict(), "optimizer": optimizer.state_dict(), "rng": states,
                                     "bad_images": bad_images, "finished": finished}, checkpoint_path)

    # ---- loop --------------------------------------------------------------------
    progress = tqdm(total=args.steps, initial=step, desc="stand-in", disable=rank != 0, dynamic_ncols=True)
    log, bad_in_a_row = harness.MetricsLog(metrics_path, rank, world_size), 0
    while step < args.steps:
        images, labels = next(loader)
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if args.hflip:
            flip = torch.rand(images.shape[0], device=device) < 0.5
            images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
        optimizer.zero_grad(set_to_none=True)
        with autocast(device):
            logits = train_model(images)                                    # (N, classes)
            loss = F.cross_entropy(logits.float(), labels)
        loss.backward()
        grad_norm = clip_gradients(params, args.grad_clip)
        if all_finite([loss, grad_norm], world_size):
            optimizer.step()
            update_ema(ema, model, ema_decay(step, args.ema_decay, args.ema_warmup))
            log.add({"accuracy": (logits.argmax(1) == labels).float().mean(), "grad_norm": grad_norm,
                     "loss": loss.detach()})
            bad_in_a_row = 0
        else:   # no update, the batch is spent; a run of them means the weights are beyond repair
            skipped, bad_in_a_row = skipped + 1, bad_in_a_row + 1
            log.skip()
            harness.stop_if_beyond_repair(bad_in_a_row, args.max_bad_steps, step + 1, checkpoint_path,
                                          "resume it with a lower --lr, or start again")
        step += 1
        progress.update(1)
        if step % args.log_every == 0 or step == args.steps:
            record = log.write(stage=0, step=step, skipped=skipped, bad_images=len(loader.bad_images(world_size)))
            progress.set_postfix(loss=f"{record['loss']:.4g}", accuracy=f"{record['accuracy']:.4g}")
        if step % args.ckpt_every == 0 and step < args.steps:
            write_checkpoint()
        if stop.requested(world_size):
            break
    progress.close()
    write_checkpoint(finished=step >= args.steps)
    if rank == 0:
        if step < args.steps:
            stop.report(step, checkpoint_path)
        else:
            print(f"stand-in done: {step} steps ({skipped} skipped); checkpoint {checkpoint_path}")
    cleanup_distributed()
    return None if step >= args.steps else harness.STOPPED


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    run = parser.add_argument_group("run")
    run.add_argument("--out", required=True, help="run folder for checkpoint.pt and metrics.jsonl")
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    run.add_argument("--steps", type=harness.positive_int, default=1000, help="total optimisation steps")
    run.add_argument("--seed", type=int, default=0)
    data = parser.add_argument_group("data")
    data.add_argument("--data", default="synthetic", type=harness.input_path("synthetic"),
                      help="'synthetic' (embedded) or an ImageFolder path; its folders are the classes")
    data.add_argument("--image-size", type=harness.positive_int, default=32)
    data.add_argument("--num-images", type=harness.positive_int, default=10000,
                      help="size of the synthetic training set")
    data.add_argument("--batch-size", type=harness.positive_int, default=32, help="per process")
    data.add_argument("--max-bad-images", type=harness.unit_interval, default=0.001,
                      help="share of the images that may be unreadable (our choice: 0.001)")
    data.add_argument("--workers", type=harness.non_negative_int, default=0, help="data loader worker processes")
    data.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=True,
                      help="random horizontal flips (our choice)")
    model = parser.add_argument_group("encoder (a DINOv2 architecture name, with overrides)")
    model.add_argument("--encoder", default="dinov2_vits14", help="DINOv2 architecture name")
    model.add_argument("--encoder-depth", type=harness.positive_int, help="override: number of blocks")
    model.add_argument("--encoder-dim", type=harness.positive_int, help="override: width")
    model.add_argument("--encoder-heads", type=harness.positive_int, help="override: attention heads")
    model.add_argument("--encoder-patch", type=harness.positive_int, help="override: patch size")
    model.add_argument("--encoder-native-size", type=harness.positive_int,
                       help="override: size of the position-embedding grid in px")
    model.add_argument("--encoder-size", type=harness.positive_int, default=32, help="encoder input size in px")
    optim = parser.add_argument_group("optimisation (our choices)")
    optim.add_argument("--lr", type=harness.non_negative_float, default=1e-4)
    optim.add_argument("--beta1", type=harness.below_one, default=0.9)
    optim.add_argument("--beta2", type=harness.below_one, default=0.95)
    optim.add_argument("--weight-decay", type=harness.non_negative_float, default=0.0)
    optim.add_argument("--grad-clip", type=harness.non_negative_float, default=1.0,
                       help="max gradient norm; 0 = no clipping")
    optim.add_argument("--ema-decay", type=harness.unit_interval, default=0.999)
    optim.add_argument("--ema-warmup", type=harness.non_negative_int, default=10,
                       help="decay is min(ema_decay, (1+step)/(warmup+step))")
    optim.add_argument("--grad-checkpoint", action="store_true", help="activation checkpointing of the blocks")
    optim.add_argument("--max-bad-steps", type=harness.positive_int, default=20,
                       help="stop after this many non-finite steps in a row (our choice)")
    logging = parser.add_argument_group("logging and checkpoints")
    logging.add_argument("--log-every", type=harness.positive_int, default=50)
    logging.add_argument("--ckpt-every", type=harness.positive_int, default=1000)
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main(parse_args()))
