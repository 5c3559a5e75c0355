"""Fewer GPUs, same recipe: --grad-accum (gradient accumulation over micro-batches, DDP
syncing only the last) gives the weights and logs of one larger batch, on one process and
on two gloo processes; --grad-checkpoint (activation checkpointing) gives the gradients of
the plain forward."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import train_diffusion
import train_tokenizer
from dit import LightningDiT
from tokenizer import AlignTok, DINOv2
from training import gradient_sync

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Stage 1 on a random tiny encoder, no LPIPS and no GAN: a run whose only randomness is the
# data order and the flips, so that two runs can agree to float tolerance.
STAGE1 = ["--stage", "1", "--encoder-weights", "random", "--encoder-depth", "1", "--encoder-dim", "32",
          "--encoder-heads", "2", "--encoder-patch", "4", "--encoder-native-size", "16", "--latent-channels", "4",
          "--decoder-width", "64", "--decoder-multipliers", "1", "1", "1", "--decoder-res-blocks", "0",
          "--perceptual-weight", "0", "--disc-weight", "0", "--image-size", "16", "--encoder-size", "16",
          "--num-images", "64", "--log-every", "1", "--lr", "1e-3", "--steps", "3"]

pytestmark = pytest.mark.usefixtures("one_thread")


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def assert_same_run(a, b, atol=2e-5):
    """Same step count, weights, EMA and logged loss and gradient norm (Adam would hide a
    gradient off by a constant factor in the weights; the logged norm does not)."""
    checkpoint_a, checkpoint_b = (torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True) for out in (a, b))
    assert checkpoint_a["step"] == checkpoint_b["step"]
    for key in ("model", "ema"):
        for name, value in checkpoint_a[key].items():
            torch.testing.assert_close(checkpoint_b[key][name], value, atol=atol, rtol=1e-4, msg=lambda m: f"{key} {name}: {m}")
    records_a, records_b = metrics(a), metrics(b)
    assert [r["step"] for r in records_a] == [r["step"] for r in records_b]
    for ra, rb in zip(records_a, records_b):
        for name in ("loss", "grad_norm"):
            assert rb[name] == pytest.approx(ra[name], rel=1e-4), (name, ra["step"])


def test_tokenizer_accumulation_equals_larger_batch(tmp_path):
    run = lambda out, *extra: train_tokenizer.main(train_tokenizer.parse_args(STAGE1 + ["--out", str(out), *extra]))
    run(tmp_path / "big", "--batch-size", "8")
    run(tmp_path / "accum", "--batch-size", "4", "--grad-accum", "2")
    assert_same_run(tmp_path / "big", tmp_path / "accum")
    assert len(metrics(tmp_path / "accum")) == 3                   # steps are optimiser steps


def test_resume_refuses_another_grad_accum_and_takes_runs_saved_before_the_flag(tmp_path):
    run = lambda *extra: train_tokenizer.main(train_tokenizer.parse_args(
        STAGE1 + ["--out", str(tmp_path / "run"), "--batch-size", "4", *extra]))
    run("--steps", "1")
    with pytest.raises(SystemExit, match="--grad-accum 2"):
        run("--steps", "2", "--resume", "--grad-accum", "2")
    path = tmp_path / "run" / "checkpoint.pt"
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["args"]["grad_accum"], checkpoint["args"]["grad_checkpoint"]     # as saved before the flags
    torch.save(checkpoint, path)
    run("--steps", "2", "--resume", "--grad-checkpoint")
    assert torch.load(path, weights_only=True)["step"] == 2


def test_two_gloo_processes_accumulating_equal_one_process(tmp_path):
    """2 processes x batch 4 x 2 micro-batches == 1 process x batch 16: the same images in
    each step (flips off: they are drawn per rank), DDP's mean over ranks included. The
    latent statistics over 33 images: the ranks' shares (17 and 16) differ by one batch."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
               "train_tokenizer.py", *STAGE1, "--out", str(tmp_path / "ddp"), "--batch-size", "4", "--grad-accum",
               "2", "--no-hflip", "--stats-images", "33"]
    result = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    train_tokenizer.main(train_tokenizer.parse_args(STAGE1 + ["--out", str(tmp_path / "one"), "--batch-size", "16",
                                                              "--no-hflip", "--stats-images", "33"]))
    assert_same_run(tmp_path / "one", tmp_path / "ddp")                     # the EMA holds the statistics


def test_diffusion_accumulation_equals_larger_batch(tmp_path, monkeypatch):
    """The flow loss draws its noise per call, so micro-batches draw other noise than one
    batch; a noise-free stand-in for it isolates what accumulation must keep equal."""
    torch.manual_seed(0)
    tok = AlignTok("dinov2_vits14", dict(depth=1, embed_dim=32, num_heads=2, patch_size=8, img_size=32),
                   latent_channels=4, decoder_width=16, decoder_multipliers=(1, 2, 2, 2), decoder_res_blocks=0,
                   image_size=32, encoder_size=32)
    path = str(tmp_path / "tokenizer.pt")
    torch.save({"stage": 3, "tokenizer_config": tok.config, "model": tok.state_dict(), "ema": tok.state_dict(),
                "step": 0}, path)

    def noise_free_loss(model, x, y, cosine_weight):
        t = torch.full((x.shape[0],), 0.3)
        loss = F.mse_loss(model(0.3 * x + 0.7 * torch.cos(3 * x), t, y), x - torch.cos(3 * x))
        return loss, {"mse": loss.detach(), "cosine": loss.detach() * 0}
    monkeypatch.setattr(train_diffusion, "flow_loss", noise_free_loss)
    common = ["--tokenizer", path, "--num-images", "32", "--depth", "1", "--hidden-size", "32", "--num-heads", "2",
              "--steps", "3", "--log-every", "1", "--sample-every", "100", "--sample-columns", "1",
              "--sample-steps", "1", "--label-dropout", "0.3", "--lr", "1e-2"]
    train_diffusion.main(train_diffusion.parse_args(common + ["--out", str(tmp_path / "big"), "--batch-size", "8",
                                                              "--cache-dir", str(tmp_path / "cache")]))
    train_diffusion.main(train_diffusion.parse_args(common + ["--out", str(tmp_path / "accum"), "--batch-size", "4",
                                                              "--grad-accum", "2", "--cache-dir",
                                                              str(tmp_path / "cache")]))
    assert_same_run(tmp_path / "big", tmp_path / "accum")


def test_gradient_sync_all_reduces_once_per_step(tmp_path):
    """Under DDP the inner micro-batches skip the all-reduce (counted by a comm hook)."""
    if dist.is_initialized():
        pytest.skip("a process group is already up")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 4))
        calls = []

        def counting_hook(state, bucket):
            calls.append(1)
            future = torch.futures.Future()
            future.set_result(bucket.buffer())
            return future
        model.register_comm_hook(None, counting_hook)
        for k in range(3):
            with gradient_sync(model, last=k == 2):
                model(torch.randn(2, 4)).sum().backward()
        assert len(calls) == 1
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("which", ["dit", "dinov2"])
def test_grad_checkpoint_gives_the_same_gradients(which):
    torch.manual_seed(0)
    if which == "dit":
        model = LightningDiT(input_size=4, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=3)
        for p in model.parameters():      # off DiT's zero init, so that every block gets a gradient
            p.data.add_(0.05 * torch.randn_like(p))
        inputs = (torch.randn(2, 4, 4, 4), torch.rand(2), torch.tensor([0, 3]))
        forward = lambda: model(*inputs).square().mean()
    else:
        model = DINOv2(embed_dim=32, depth=2, num_heads=2, patch_size=4, img_size=16)
        x = torch.randn(2, 3, 16, 16)
        forward = lambda: model.forward_features(x)["x_norm_patchtokens"].square().mean()
    gradients, calls = [], []
    model.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
    for enabled in (False, True):
        model.grad_checkpoint = enabled
        model.zero_grad()
        calls.clear()
        forward().backward()
        gradients.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        assert len(calls) == (2 if enabled else 1)          # checkpointed: recomputed in the backward pass
    assert gradients[0].keys() == gradients[1].keys() and len(gradients[0]) > 10
    for name in gradients[0]:
        torch.testing.assert_close(gradients[1][name], gradients[0][name], atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def test_gan_with_accumulation_and_checkpointing_runs(tmp_path):
    """Stage 2 with the GAN under --grad-accum (adaptive weight per micro-batch, the
    discriminator's gradient accumulated too) and --grad-checkpoint on the trained encoder:
    it runs and logs once per optimiser step."""
    gan = ["--batch-size", "4", "--disc-weight", "0.5", "--disc-start", "0", "--disc-layers", "2"]
    train_tokenizer.main(train_tokenizer.parse_args(STAGE1 + gan + ["--out", str(tmp_path / "s1"), "--steps", "1"]))
    stage2 = ["--stage", "2"] + STAGE1[4:]            # without --encoder-weights (the model comes from --init)
    train_tokenizer.main(train_tokenizer.parse_args(
        stage2 + gan + ["--out", str(tmp_path / "s2"), "--init", str(tmp_path / "s1" / "checkpoint.pt"),
                        "--grad-accum", "2", "--grad-checkpoint", "--stats-images", "8"]))
    records = metrics(tmp_path / "s2")
    assert [r["step"] for r in records] == [1, 2, 3] and all(r["d_loss"] is not None for r in records)
