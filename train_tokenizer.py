r"""
Trains the AlignTok tokenizer in the paper's three stages (arXiv 2509.25162):

    stage 1: adapter + decoder learn to reconstruct; DINOv2 frozen          (L_rec)
    stage 2: everything trains, held near stage 1 by semantic preservation (L_rec + w_sp * L_sp)
    stage 3: decoder only, the latent space frozen                           (L_rec)

(CPU runs without DINOv2 weights start stage 1 from the stand-in encoder of
train_stand_in.py instead.)

Launch (one GPU: python train_tokenizer.py ...; several: torchrun):

    torchrun --nproc_per_node=8 train_tokenizer.py --stage 1 --data /data/imagenet/train \
        --image-size 256 --encoder dinov2_vitl14 --encoder-weights dinov2_vitl14_pretrain.pth \
        --encoder-size 224 --out runs/stage1
    torchrun --nproc_per_node=8 train_tokenizer.py --stage 2 --data /data/imagenet/train \
        --init runs/stage1/checkpoint.pt --out runs/stage2
    torchrun --nproc_per_node=8 train_tokenizer.py --stage 3 --data /data/imagenet/train \
        --init runs/stage2/checkpoint.pt --out runs/stage3

Each run folder gets checkpoint.pt (written atomically; --resume continues it exactly),
metrics.jsonl and recon.png (originals over reconstructions).
"""
import argparse
import copy
import os
import sys

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from data import build_dataset, skipping_unreadable, step_loader
import harness
from losses import (PatchDiscriminator, adaptive_weight, generator_loss, hinge_d_loss, load_lpips,
                    patch_grid_size, semantic_preservation_loss)
from tokenizer import AlignTok, stand_in_from_checkpoint
from training import (all_finite, autocast, cleanup_distributed, clip_gradients, ema_decay, gradient_sync, psnr,
                      setup_distributed, unwrap, update_ema)
from weights import load_state_dict_strict, official_dinov2_layout, read_dinov2_weights


#################################################################################
#                                Models per stage                               #
#################################################################################

def encoder_overrides(args):
    """Architecture overrides of the encoder given on the command line."""
    names = {"depth": args.encoder_depth, "embed_dim": args.encoder_dim, "num_heads": args.encoder_heads,
             "patch_size": args.encoder_patch, "img_size": args.encoder_native_size}
    return {k: v for k, v in names.items() if v is not None}


def read_init(args):
    """The previous stage's checkpoint, checked to be the stage before this one."""
    if args.init is None:
        raise SystemExit(f"error: stage {args.stage} needs --init pointing at the stage-{args.stage - 1} "
                         f"checkpoint (runs/.../checkpoint.pt of the previous stage)")
    checkpoint = harness.load_checkpoint(args.init, "--init checkpoint",
                                         f"pass the stage-{args.stage - 1} run's checkpoint.pt")
    if checkpoint.get("stage") != args.stage - 1:
        raise SystemExit(f"error: stage {args.stage} must start from a stage-{args.stage - 1} checkpoint, but "
                         f"{args.init} is from stage {checkpoint.get('stage')}; run the stages in order 1, 2, 3")
    problem = harness.unfinished(checkpoint, f"--init {args.init}")
    if problem:
        raise SystemExit(f"error: {problem}")
    return checkpoint


def pretrained_encoder(args):
    """(architecture overrides, state dict) of stage 1's encoder: official DINOv2 weights,
    a Hugging Face file, the stand-in of train_stand_in.py (which carries its own architecture), or
    'random' (an untrained encoder, for ablations and tests)."""
    path = args.encoder_weights
    if path is None:
        raise SystemExit("error: stage 1 needs --encoder-weights: an official dinov2_*_pretrain.pth, a Hugging "
                         "Face model.safetensors, a train_stand_in.py checkpoint, or 'random' for an untrained "
                         "encoder")
    if path == "random":
        return encoder_overrides(args), None
    if not os.path.isfile(path):
        raise SystemExit(f"error: --encoder-weights file not found: {path}")
    try:
        if path.endswith(".safetensors"):
            return encoder_overrides(args), read_dinov2_weights(path)
        # read once: DINOv2-L is 1.2 GB
        checkpoint = harness.load_checkpoint(path, "--encoder-weights file", "an official dinov2_*_pretrain.pth, a "
                                             "Hugging Face model.safetensors or a train_stand_in.py checkpoint")
        if checkpoint.get("stage") == 0:   # train_stand_in.py's
            problem = harness.unfinished(checkpoint, f"--encoder-weights {path}")
            if problem:
                raise SystemExit(f"error: {problem}")
            encoder = stand_in_from_checkpoint(checkpoint, path).encoder
            return encoder.config, encoder.state_dict()
        return encoder_overrides(args), official_dinov2_layout(checkpoint, path)
    except ValueError as error:
        raise SystemExit(f"error: --encoder-weights: {error}") from None


def build_tokenizer(args, init):
    """Stage 1: a new AlignTok around the pretrained encoder. Stages 2 and 3: the previous
    stage's tokenizer with its EMA weights."""
    if init is not None:
        tokenizer = AlignTok(**init["tokenizer_config"])
        load_state_dict_strict(tokenizer, init["ema"], args.init)
        return tokenizer
    overrides, state = pretrained_encoder(args)
    tokenizer = AlignTok(args.encoder, overrides, args.latent_channels, args.adapter_hidden, args.decoder_width,
                         args.decoder_multipliers, args.decoder_res_blocks, args.image_size, args.encoder_size)
    if state is not None:
        load_state_dict_strict(tokenizer.encoder, state, args.encoder_weights)
    return tokenizer


def build_stage(args, init):
    """(model, optimiser parameter groups, stage 2's frozen reference or None): what
    trains in this stage, with --lr for everything but stage 2's encoder (--encoder-lr)."""
    try:
        model = build_tokenizer(args, init)
    except ValueError as error:   # the constructors check that the sizes fit together
        raise SystemExit(f"error: the model flags do not fit together: {error}") from None
    reference = model.frozen_reference() if args.stage == 2 else None
    model.set_trainable(args.stage)
    encoder_params = [p for p in model.encoder.parameters() if p.requires_grad]
    other_params = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("encoder.")]
    groups = [{"params": other_params, "lr": args.lr}]
    if encoder_params:
        groups.append({"params": encoder_params, "lr": args.encoder_lr})
    return model, groups, reference


def build_perceptual(args, device):
    """LPIPS when --perceptual-weight > 0 (parse_args made sure its files are given)."""
    if args.perceptual_weight == 0:
        return None
    return load_lpips(args.vgg_weights, args.lpips_weights).to(device)


def build_gan(args, init, resume, image_size, device):
    """(discriminator, its optimiser, the step of this stage at which the GAN starts), or
    (None, None, None). The discriminator of the previous stage carries over from --init,
    already trained, so its GAN is on from the first step; --fresh-discriminator, or a
    previous stage without one, starts a new discriminator that joins at --disc-start (our
    choice: the paper is silent; LDM and VA-VAE carry the discriminator across phases).
    A resumed run keeps the discriminator its checkpoint holds, whatever the flags say."""
    carried = init is not None and "discriminator" in init and not args.fresh_discriminator
    source = resume if resume is not None else (init if carried else None)
    if args.disc_weight == 0 and (source is None or "discriminator" not in source):
        return None, None, None
    config = source["disc_config"] if source is not None and "disc_config" in source else \
        dict(in_channels=3, width=64, n_layers=args.disc_layers, norm=args.disc_norm)
    if patch_grid_size(image_size, config["n_layers"]) < 1:
        raise SystemExit(f"error: a PatchGAN with --disc-layers {config['n_layers']} has no output on {image_size} px "
                         f"images; lower --disc-layers (3 needs images of at least 32 px)")
    discriminator = PatchDiscriminator(**config).to(device)
    optimizer = torch.optim.AdamW(discriminator.parameters(), lr=args.disc_lr, betas=tuple(args.disc_betas),
                                  weight_decay=0.0)
    gan_start = args.disc_start
    if source is not None and "discriminator" in source:
        label = "--resume checkpoint" if source is resume else args.init
        load_state_dict_strict(discriminator, source["discriminator"], label)
        optimizer.load_state_dict(source["disc_optimizer"])
        gan_start = source["gan_start"] if source is resume else 0
    return discriminator, optimizer, gan_start


@torch.no_grad()
def compute_latent_statistics(tokenizer, dataset, args, rank, world_size, device, stop):
    """Per-channel mean and unbiased std of z over a seeded random subset of up to
    --stats-images unflipped training images, sharded across ranks and summed; None when
    a signal arrived (checked every batch: a scheduler's grace period can be shorter than
    the statistics of 10,000 large images)."""
    count = min(args.stats_images, len(dataset))
    chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed))[:count]
    subset = torch.utils.data.Subset(skipping_unreadable(dataset), chosen[rank::world_size].tolist())
    loader = torch.utils.data.DataLoader(subset, batch_size=args.batch_size, num_workers=args.workers)
    sums = torch.zeros(3, tokenizer.latent_mean.numel(), dtype=torch.float64, device=device)  # n, sum, squares
    # The signal check is collective, so every rank makes it at the same batches: those that
    # the smallest share has (a rank's share may be one image, and so one batch, longer).
    checked_batches = -(-(count // world_size) // args.batch_size)
    for i, (images, *_) in enumerate(tqdm(loader, desc="latent statistics", disable=rank != 0,
                                          dynamic_ncols=True)):
        if i < checked_batches and stop.requested(world_size):
            return None
        with autocast(device):
            z = tokenizer.encode(images.to(device)).double()       # (N, C, h, w)
        z = z.transpose(0, 1).flatten(1)                           # (C, N*h*w)
        sums += torch.stack((torch.full_like(z[:, 0], z.shape[1]), z.sum(1), (z ** 2).sum(1)))
    if world_size > 1:
        torch.distributed.all_reduce(sums)
    n, total, squares = sums
    mean = total / n
    std = ((squares - n * mean ** 2) / (n - 1)).clamp_min(1e-12).sqrt()
    return mean.float(), std.float()


def store_latent_statistics(ema, model, dataset, args, rank, world_size, device, stop):
    """Computes the latent statistics with the EMA tokenizer and stores them in both; False
    when stopped by a signal. Under fork_rng: the checkpoint must hold the training RNG, so
    that extending the run with --resume --steps continues exactly as one longer run would."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        statistics = compute_latent_statistics(ema, dataset, args, rank, world_size, device, stop)
    if statistics is None:
        return False
    for tokenizer in (ema, model):
        tokenizer.latent_mean.copy_(statistics[0])
        tokenizer.latent_std.copy_(statistics[1])
    return True


#################################################################################
#                               One training step                               #
#################################################################################

def tokenizer_loss(args, train_model, model, images, perceptual, reference, discriminator):
    """L_rec (+ w_sp * L_sp in stage 2) for the tokenizer, with the GAN term when a
    discriminator is given; returns the loss, the reconstruction and a dict of the terms
    for logging."""
    reconstruction, z, tokens = train_model(images)
    reconstruction = reconstruction.float()
    logs = {"l1": (reconstruction - images).abs().mean()}
    loss = logs["l1"]
    if perceptual is not None:
        logs["perceptual"] = perceptual(reconstruction, images).mean()
        loss = loss + args.perceptual_weight * logs["perceptual"]
    if reference is not None:
        with torch.no_grad():
            reference_tokens = reference.encoder_tokens(images)                  # (N, h*w, D)
            reference_z = reference.adapter(reference_tokens, reference.grid_size)  # (N, C, h, w)
        if args.sp_placement == "latent":
            logs["sp"] = semantic_preservation_loss(z, reference_z, args.sp_loss)
        else:  # the paper's ablation: preserve the encoder features before the adapter, as (N, D, h*w, 1)
            logs["sp"] = semantic_preservation_loss(tokens.transpose(1, 2).unsqueeze(-1),
                                                    reference_tokens.transpose(1, 2).unsqueeze(-1), args.sp_loss)
        loss = loss + args.sp_weight * logs["sp"]
    if discriminator is not None:
        # The generator's GAN term goes through the bare discriminator with its weights frozen:
        # only the discriminator's own step below updates it, through DDP.
        critic = unwrap(discriminator).requires_grad_(False)
        logs["gan"] = generator_loss(critic(reconstruction))
        # `loss` may include w_sp * L_sp: harmless, since L_sp has no path to the decoder's last
        # layer, so its gradient there (the numerator of lambda_adapt) is that of L_rec alone.
        logs["lambda"] = adaptive_weight(loss, logs["gan"], model.decoder.last_layer)
        loss = loss + args.disc_weight * logs["lambda"] * logs["gan"]
        critic.requires_grad_(True)
    logs["psnr"] = psnr((reconstruction.detach().clamp(-1, 1) + 1) / 2, (images + 1) / 2).mean()
    return loss, reconstruction, logs


def accumulate_gradients(args, train_model, model, images, perceptual, reference, discriminator):
    """Forward and backward of one optimiser step's --grad-accum micro-batches, each loss
    divided by their number, so that the summed gradients are those of the mean loss over
    the whole batch; DDP all-reduces once, after the last. With the GAN the adaptive weight
    is computed per micro-batch, from that micro-batch's own losses. Returns the mean loss,
    the mean of each logged term, and the micro-batches with their reconstructions for the
    discriminator's step."""
    micro_images = images.chunk(args.grad_accum)
    loss, reconstructions, micro_logs = 0.0, [], []
    for k, images_k in enumerate(micro_images):
        with gradient_sync(train_model, last=k == args.grad_accum - 1):
            with autocast(images.device):
                loss_k, reconstruction, logs_k = tokenizer_loss(args, train_model, model, images_k, perceptual,
                                                                reference, discriminator)
            (loss_k / args.grad_accum).backward()
        loss = loss + loss_k.detach() / args.grad_accum
        reconstructions.append(reconstruction.detach())
        micro_logs.append(logs_k)
    logs = {name: sum(l[name] for l in micro_logs) / args.grad_accum for name in micro_logs[0]}
    return loss, logs, micro_images, reconstructions


def discriminator_step(discriminator, disc_optimizer, images, reconstructions, device):
    """One update of the discriminator with the hinge loss, its gradient accumulated over
    the step's micro-batches (lists of images and their reconstructions); real and
    reconstructed images go in one call (one forward per micro-batch, as DDP expects).
    Returns the loss, averaged over the micro-batches."""
    disc_optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for k, (real, fake) in enumerate(zip(images, reconstructions)):
        with gradient_sync(discriminator, last=k == len(images) - 1):
            with autocast(device):
                logits_real, logits_fake = discriminator(torch.cat((real, fake.detach()))).chunk(2)
                loss = hinge_d_loss(logits_real, logits_fake) / len(images)
            loss.backward()
        total = total + loss.detach()
    disc_optimizer.step()
    return total


#################################################################################
#                              Resume and previews                              #
#################################################################################

def restore(resume, path, model, ema, optimizer):
    """Loads a resumed run's weights and optimiser state (build_gan restores the
    discriminator's); returns its (step, skipped steps)."""
    load_state_dict_strict(model, resume["model"], path)
    load_state_dict_strict(ema, resume["ema"], path)
    optimizer.load_state_dict(resume["optimizer"])
    return resume["step"], resume.get("skipped", 0)


def compile_parts(model, backend):
    """torch.compile every part of the model in place except the decoder's output layers.
    The adaptive GAN weight differentiates the loss at the decoder's last convolution with
    retain_graph, which a compiled backward refuses (its buffers are donated); left eager,
    those two layers are all that differentiation needs, and state-dict names stay as
    they are."""
    for part in (model.encoder, model.adapter, model.decoder.conv_in, model.decoder.mid, model.decoder.up):
        part.compile(backend=backend)
    return model


@torch.no_grad()
def save_reconstructions(ema, preview, path):
    """The preview images over the EMA tokenizer's reconstructions of them."""
    with autocast(preview.device):
        harness.save_grid(torch.cat((preview, ema.decode(ema.encode(preview)).float())), path, nrow=8)


#################################################################################
#                               Training loop                                   #
#################################################################################

def main(args):
    # ---- setup -----------------------------------------------------------------
    stop = harness.StopSignal()
    rank, world_size, device = setup_distributed()
    checkpoint_path, resume = harness.open_run(args, rank, world_size, lambda checkpoint:
                                       None if checkpoint.get("stage") == args.stage else
                                       f"is a stage-{checkpoint.get('stage')} run, not stage {args.stage}")
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    init = read_init(args) if args.stage > 1 else None
    torch.manual_seed(args.seed + rank)

    # ---- data --------------------------------------------------------------------
    image_size = init["tokenizer_config"]["image_size"] if init is not None else args.image_size
    dataset = build_dataset(args.data, image_size, "train", args.num_images, args.seed)
    preview_set = build_dataset(args.data, image_size, "val", 8, args.seed) if args.data == "synthetic" else \
        skipping_unreadable(dataset)
    preview = torch.stack([preview_set[i * (len(preview_set) // 8)][0] for i in range(8)]).to(device)

    # ---- model -------------------------------------------------------------------
    model, groups, reference = build_stage(args, init)
    model.to(device)
    model.encoder.grad_checkpoint = args.grad_checkpoint
    reference = reference.to(device) if reference is not None else None
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    optimizer = torch.optim.AdamW(groups, betas=(args.beta1, args.beta2), weight_decay=args.weight_decay)
    discriminator, disc_optimizer, gan_start = build_gan(args, init, resume, image_size, device)
    perceptual = build_perceptual(args, device)
    del init
    step, skipped = (0, 0) if resume is None else restore(resume, checkpoint_path, model, ema, optimizer)
    train_model = compile_parts(model, args.compile_backend) if args.compile else model
    if world_size > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        train_model = DDP(train_model, device_ids=device_ids)
        discriminator = DDP(discriminator, device_ids=device_ids) if discriminator is not None else None
        if resume is None:   # DDP gave every rank rank 0's initial weights (ranks seed differently); so must the EMA
            ema.load_state_dict(model.state_dict())
    # Each step loads this rank's whole share of the global batch, so that the micro-batches
    # of --grad-accum are the same images, and draw the same flips, as one larger batch.
    loader = step_loader(dataset, args.batch_size * args.grad_accum, rank, world_size, args.seed, step, args.workers,
                         device, args.max_bad_images, known_bad=[] if resume is None else resume.get("bad_images", []))
    if rank == 0:   # the lock is held until the process ends (open_run took it to resume)
        harness.lock_folder(args.out, new_file=checkpoint_path if resume is None else None)
        harness.check_free_space(args.out, harness.checkpoint_bytes(model), "a checkpoint")
        harness.trim_metrics(metrics_path, step)
    if resume is not None:  # last: building the loader iterator draws from the global RNG
        harness.set_rng_state(resume["rng"][rank])

    # ---- checkpoint --------------------------------------------------------------
    def write_checkpoint(finished=False):
        states, bad_images = harness.gather_rng_states(world_size, model, ema), loader.bad_images(world_size)
        if rank != 0:
            return
        state = {"stage": args.stage, "step": step, "skipped": skipped, "args": vars(args),
                 "tokenizer_config": model.config,
                 "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                 "rng": states, "bad_images": bad_images, "finished": finished}
        if discriminator is not None:
            state.update(discriminator=unwrap(discriminator).state_dict(), disc_config=unwrap(discriminator).config,
                         disc_optimizer=disc_optimizer.state_dict(), gan_start=gan_start)
        harness.save_checkpoint(state, checkpoint_path)

    # ---- loop --------------------------------------------------------------------
    progress = tqdm(total=args.steps, initial=step, desc=f"stage {args.stage}", disable=rank != 0,
                    dynamic_ncols=True)
    log, record, bad_in_a_row = harness.MetricsLog(metrics_path, rank, world_size), {}, 0
    while step < args.steps:
        images, _ = next(loader)
        images = images.to(device, non_blocking=True)
        if args.hflip:
            flip = torch.rand(images.shape[0], device=device) < 0.5
            images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
        gan_on = discriminator is not None and args.disc_weight > 0 and step >= gan_start
        optimizer.zero_grad(set_to_none=True)
        loss, logs, micro_images, reconstructions = accumulate_gradients(
            args, train_model, model, images, perceptual, reference, discriminator if gan_on else None)
        logs["grad_norm"] = clip_gradients([p for g in groups for p in g["params"]], args.grad_clip)
        if all_finite([loss, logs["grad_norm"]], world_size):
            optimizer.step()
            update_ema(ema, model, ema_decay(step, args.ema_decay, args.ema_warmup))
            if gan_on:
                logs["d_loss"] = discriminator_step(discriminator, disc_optimizer, micro_images, reconstructions,
                                                    device)
            log.add(dict(logs, loss=loss))
            bad_in_a_row = 0
        else:   # no update, the batch is spent; a run of them means the weights are beyond repair
            skipped, bad_in_a_row = skipped + 1, bad_in_a_row + 1
            log.skip()
            harness.stop_if_beyond_repair(bad_in_a_row, args.max_bad_steps, step + 1, checkpoint_path,
                                  "resume it with a lower --lr or --disc-weight, or start again")
        step += 1
        progress.update(1)

        if step % args.log_every == 0 or step == args.steps:
            record = log.write(stage=args.stage, step=step, skipped=skipped,
                               bad_images=len(loader.bad_images(world_size)))
            progress.set_postfix({k: f"{v:.4g}" for k, v in record.items()
                                  if k in ("loss", "psnr") and v is not None})
        if rank == 0 and (step % args.sample_every == 0 or step == args.steps):
            save_reconstructions(ema, preview, os.path.join(args.out, "recon.png"))
        if step % args.ckpt_every == 0 and step < args.steps:
            write_checkpoint()
        if stop.requested(world_size):
            break
    progress.close()

    # ---- latent statistics (every tokenizer stage) and the final checkpoint --------
    # A signal, in the loop or during the statistics, saves the weights and goes; --resume
    # then computes the statistics (a resumed run at its last step goes straight here).
    finished = step >= args.steps and store_latent_statistics(ema, model, dataset, args, rank, world_size, device,
                                                              stop)
    write_checkpoint(finished)
    if not finished:
        if rank == 0:
            stop.report(step, checkpoint_path)
        cleanup_distributed()
        return harness.STOPPED
    if rank == 0:
        summary = ", ".join(f"{k} {v:.4g}" for k, v in record.items() if k in ("loss", "psnr", "sp")
                            and v is not None)
        print(f"stage {args.stage} done: {step} steps ({skipped} skipped), {summary}; checkpoint {checkpoint_path}")
    cleanup_distributed()


#################################################################################
#                                 Arguments                                     #
#################################################################################

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    stage = parser.add_argument_group("stage and run")
    stage.add_argument("--stage", type=int, required=True, choices=[1, 2, 3], help="the paper's stage: 1, 2 or 3")
    stage.add_argument("--out", required=True, help="run folder for checkpoint.pt, metrics.jsonl and recon.png")
    stage.add_argument("--init", type=harness.input_path(), help="stages 2 and 3: the previous stage's checkpoint.pt")
    stage.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    stage.add_argument("--steps", type=harness.positive_int, default=1000,
                       help="total optimisation steps of this stage")
    stage.add_argument("--seed", type=int, default=0)
    data = parser.add_argument_group("data")
    data.add_argument("--data", default="synthetic", type=harness.input_path("synthetic"),
                      help="'synthetic' (embedded) or an ImageFolder path")
    data.add_argument("--image-size", type=harness.positive_int, default=32, help="image size (ImageNet: 256)")
    data.add_argument("--num-images", type=harness.positive_int, default=10000,
                      help="size of the synthetic training set")
    data.add_argument("--batch-size", type=harness.positive_int, default=32,
                      help="per process (GPU) and micro-batch; the global batch is this x processes x --grad-accum")
    data.add_argument("--grad-accum", type=harness.positive_int, default=1,
                      help="micro-batches per optimiser step, gradients accumulated (fewer GPUs, same recipe)")
    data.add_argument("--max-bad-images", type=harness.unit_interval, default=0.001,
                      help="share of the data set's images that may be unreadable; each is skipped, named once and "
                           "counted (bad_images in metrics.jsonl), more stops the run (our choice: 0.001)")
    data.add_argument("--workers", type=harness.non_negative_int, default=0, help="data loader worker processes")
    data.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=True,
                      help="random horizontal flips of the training images (our choice)")
    model = parser.add_argument_group("model (stage 1; later stages take it from --init)")
    model.add_argument("--encoder", default="dinov2_vits14", help="DINOv2 architecture name (ImageNet: dinov2_vitl14)")
    model.add_argument("--encoder-weights", type=harness.input_path("random"),
                       help="official DINOv2 .pth, HF model.safetensors, a train_stand_in.py checkpoint, "
                            "or 'random'")
    model.add_argument("--encoder-depth", type=harness.positive_int, help="override: number of blocks")
    model.add_argument("--encoder-dim", type=harness.positive_int, help="override: width")
    model.add_argument("--encoder-heads", type=harness.positive_int, help="override: attention heads")
    model.add_argument("--encoder-patch", type=harness.positive_int, help="override: patch size")
    model.add_argument("--encoder-native-size", type=harness.positive_int,
                       help="override: size of the position-embedding grid in px")
    model.add_argument("--encoder-size", type=harness.positive_int, default=32,
                       help="encoder input size in px (ImageNet: 224)")
    model.add_argument("--latent-channels", type=harness.positive_int, default=32,
                       help="latent width C (paper: 32; 64 also studied)")
    model.add_argument("--adapter-hidden", type=harness.positive_int,
                       help="adapter hidden width (our choice: the encoder width)")
    model.add_argument("--decoder-width", type=harness.positive_int, default=128)
    model.add_argument("--decoder-multipliers", type=harness.positive_int, nargs="+", default=[1, 1, 2, 2, 4])
    model.add_argument("--decoder-res-blocks", type=harness.non_negative_int, default=2)
    optim = parser.add_argument_group("optimisation (our choices; the paper publishes none)")
    optim.add_argument("--lr", type=harness.non_negative_float, default=1e-4,
                       help="adapter / decoder")
    optim.add_argument("--encoder-lr", type=harness.non_negative_float, default=1e-5, help="DINOv2 in stage 2")
    optim.add_argument("--beta1", type=harness.below_one, default=0.9)
    optim.add_argument("--beta2", type=harness.below_one, default=0.95)
    optim.add_argument("--weight-decay", type=harness.non_negative_float, default=0.0)
    optim.add_argument("--grad-clip", type=harness.non_negative_float, default=1.0,
                       help="max gradient norm; 0 = no clipping")
    optim.add_argument("--ema-decay", type=harness.unit_interval, default=0.999)
    optim.add_argument("--ema-warmup", type=harness.non_negative_int, default=10,
                       help="decay is min(ema_decay, (1+step)/(warmup+step))")
    optim.add_argument("--compile", action="store_true", help="torch.compile the model (all but the decoder's "
                                                              "output layers, which the adaptive GAN weight needs)")
    optim.add_argument("--compile-backend", default="inductor",
                       help="torch.compile backend (aot_eager compiles in seconds, for CPU rehearsals)")
    optim.add_argument("--grad-checkpoint", action="store_true",
                       help="activation checkpointing of the DINOv2 blocks: less memory, one more forward")
    optim.add_argument("--max-bad-steps", type=harness.positive_int, default=20,
                       help="stop after this many non-finite steps in a row (each is skipped and counted; "
                            "our choice)")
    loss = parser.add_argument_group("losses")
    loss.add_argument("--perceptual-weight", type=harness.non_negative_float, default=1.0,
                      help="LPIPS weight; > 0 needs the two files below, 0 turns LPIPS off")
    loss.add_argument("--vgg-weights", type=harness.input_path(), help="torchvision's vgg16-397923af.pth for LPIPS")
    loss.add_argument("--lpips-weights", type=harness.input_path(),
                      help="lpips' weights/v0.1/vgg.pth (the five linear heads)")
    loss.add_argument("--disc-weight", type=harness.non_negative_float, default=0.5,
                      help="generator GAN weight times lambda_adapt; 0 = off")
    loss.add_argument("--disc-start", type=harness.non_negative_int, default=20000,
                      help="step of this stage at which a new discriminator's GAN term starts (our choice); a "
                           "discriminator carried from --init is trained already and joins at once")
    loss.add_argument("--fresh-discriminator", action="store_true",
                      help="start a new discriminator instead of carrying the previous stage's (our choice: carry)")
    loss.add_argument("--disc-lr", type=harness.non_negative_float, default=1e-4)
    loss.add_argument("--disc-layers", type=harness.positive_int, default=3,
                      help="PatchGAN depth (LDM: 3; needs images >= 32 px)")
    loss.add_argument("--disc-betas", type=harness.below_one, nargs=2, default=[0.5, 0.9],
                      help="discriminator AdamW betas (LDM)")
    loss.add_argument("--disc-norm", default="group", choices=["batch", "group", "none"],
                      help="our choice: group (no batch statistics, so DDP ranks and the real/fake halves do "
                           "not mix); batch is LDM's")
    loss.add_argument("--sp-weight", type=harness.non_negative_float, default=1.0,
                      help="w_sp (paper: 1 on ImageNet, 3 on LAION)")
    loss.add_argument("--sp-loss", default="l2", choices=["l2", "cosine"], help="semantic preservation distance")
    loss.add_argument("--sp-placement", default="latent", choices=["latent", "features"],
                      help="on the adapter's latent (paper) or on the encoder features before it (ablation)")
    logging = parser.add_argument_group("logging and checkpoints")
    logging.add_argument("--log-every", type=harness.positive_int, default=50)
    logging.add_argument("--sample-every", type=harness.positive_int, default=500)
    logging.add_argument("--ckpt-every", type=harness.positive_int, default=1000)
    logging.add_argument("--stats-images", type=harness.positive_int, default=10000,
                         help="images for the latent statistics")
    args = parser.parse_args(argv)
    if args.stage > 1 and args.encoder_weights:
        parser.error(f"--encoder-weights is for stage 1; stage {args.stage} takes the encoder from --init")
    if args.perceptual_weight > 0 and not (args.vgg_weights and args.lpips_weights):
        parser.error(f"--perceptual-weight {args.perceptual_weight} needs --vgg-weights (torchvision's "
                     f"vgg16-397923af.pth) and --lpips-weights (lpips' weights/v0.1/vgg.pth); pass both, or "
                     f"--perceptual-weight 0 to train without LPIPS")
    return args


if __name__ == "__main__":
    sys.exit(main(parse_args()))
