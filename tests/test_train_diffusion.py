"""Tests for train_diffusion.py, run in-process on CPU with a tiny tokenizer (4x4x4 latents)
and a tiny LightningDiT: the latent cache (built once, reused, rebuilt when the latents could
change), what a training batch is made of, exact resume, refusals, learning, and skipped
non-finite steps."""
import glob
import json
import os

import numpy as np
import pytest
import torch

import tokenizer as tokenizer_module
import train_diffusion
from data import build_dataset
from dit import load_dit
from tokenizer import AlignTok, load_tokenizer
from train_diffusion import main, parse_args


pytestmark = pytest.mark.usefixtures("one_thread")


def save_tokenizer(tok, path):
    torch.save({"stage": 3, "tokenizer_config": tok.config, "model": tok.state_dict(), "ema": tok.state_dict(),
                "step": 0}, path)


@pytest.fixture
def tokenizer_path(tmp_path):
    """A tiny stage-3 tokenizer whose latent statistics are far from (0, 1), so that a batch
    that skipped normalisation would be obvious."""
    torch.manual_seed(0)
    tok = AlignTok("dinov2_vits14", dict(depth=1, embed_dim=32, num_heads=2, patch_size=8, img_size=32),
                   latent_channels=4, decoder_width=16, decoder_multipliers=(1, 2, 2, 2), decoder_res_blocks=1,
                   image_size=32, encoder_size=32)
    tok.latent_mean.copy_(torch.tensor([3.0, -2.0, 0.5, 1.0]))
    tok.latent_std.copy_(torch.tensor([0.5, 2.0, 0.25, 1.0]))
    path = str(tmp_path / "tokenizer.pt")
    save_tokenizer(tok, path)
    return path


def train(tokenizer_path, out, *extra, steps=4):
    """One in-process run with a tiny DiT on 32 synthetic images, batches of 8."""
    argv = ["--tokenizer", tokenizer_path, "--out", str(out), "--num-images", "32", "--batch-size", "8",
            "--depth", "1", "--hidden-size", "32", "--num-heads", "2", "--steps", str(steps), "--log-every", "1",
            "--sample-columns", "2", "--sample-steps", "2", "--ema-warmup", "10"]
    main(parse_args(argv + [str(e) for e in extra]))


def read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture
def encode_calls(monkeypatch):
    """Counts AlignTok.encode calls (only the cache builder encodes)."""
    calls = []
    original = AlignTok.encode

    def counting(self, images):
        calls.append(len(images))
        return original(self, images)
    monkeypatch.setattr(tokenizer_module.AlignTok, "encode", counting)
    return calls


#################################################################################
#                                 Latent cache                                  #
#################################################################################

def test_cache_is_built_once_reused_and_rebuilt(tmp_path, tokenizer_path, encode_calls):
    cache = tmp_path / "cache"
    train(tokenizer_path, tmp_path / "a", "--cache-dir", cache, steps=1)
    assert sum(encode_calls) == 2 * 32                                 # every image and its flip, once
    [path] = glob.glob(str(cache / "latents-*.npy"))
    mtime = os.stat(path).st_mtime_ns
    with open(path.removesuffix(".npy") + ".json") as f:
        header = json.load(f)
    assert header["shape"] == [32, 2, 4, 4, 4] and header["fingerprint"]["data"]["num_images"] == 32

    # The contents: raw z of image i and of its horizontal flip.
    tok, dataset = load_tokenizer(tokenizer_path), build_dataset("synthetic", 32, "train", 32, 0)
    images = torch.stack([dataset[i][0] for i in range(4)])
    latents = torch.from_numpy(np.load(path)[:4].astype(np.float32))
    with torch.no_grad():
        torch.testing.assert_close(latents[:, 0], tok.encode(images), atol=2e-3, rtol=1e-3)
        torch.testing.assert_close(latents[:, 1], tok.encode(images.flip(-1)), atol=2e-3, rtol=1e-3)
    assert not torch.allclose(latents[:, 0], latents[:, 1], atol=1e-2)

    # Another run on the same tokenizer and data: reused, not re-encoded.
    calls = len(encode_calls)
    train(tokenizer_path, tmp_path / "b", "--cache-dir", cache, steps=1)
    assert len(encode_calls) == calls and os.stat(path).st_mtime_ns == mtime

    # A new decoder (stage 3) leaves the latents as they were: still reused.
    state = torch.load(tokenizer_path, weights_only=True)
    tok = AlignTok(**state["tokenizer_config"])
    tok.load_state_dict(state["ema"])
    with torch.no_grad():
        for p in tok.decoder.parameters():
            p.add_(0.1)
    save_tokenizer(tok, tokenizer_path)
    train(tokenizer_path, tmp_path / "c", "--cache-dir", cache, steps=1)
    assert len(encode_calls) == calls and os.stat(path).st_mtime_ns == mtime

    # New adapter weights change the latents: a new cache is built beside the old one.
    with torch.no_grad():
        tok.adapter.apply(lambda m: m.weight.mul_(1.5) if isinstance(m, torch.nn.Linear) else None)
    save_tokenizer(tok, tokenizer_path)
    train(tokenizer_path, tmp_path / "d", "--cache-dir", cache, steps=1)
    assert sum(encode_calls[calls:]) == 2 * 32
    paths = sorted(glob.glob(str(cache / "latents-*.npy")))
    assert len(paths) == 2 and os.stat(path).st_mtime_ns == mtime
    new = np.load([p for p in paths if p != path][0]).astype(np.float32)
    assert not np.allclose(new, np.load(path).astype(np.float32), atol=1e-2)


def test_batches_are_normalised_cached_latents_flipped_at_random(tmp_path, tokenizer_path, monkeypatch):
    seen = []
    original = train_diffusion.flow_loss

    def recording(model, x, y, *args, **kwargs):
        seen.append((x.detach().clone(), y.clone()))
        return original(model, x, y, *args, **kwargs)
    monkeypatch.setattr(train_diffusion, "flow_loss", recording)
    train(tokenizer_path, tmp_path / "run", "--label-dropout", 0.5, steps=4)
    [path] = glob.glob(str(tmp_path / "run" / "latents" / "latents-*.npy"))
    cache = torch.from_numpy(np.load(path).astype(np.float32))        # (32, 2, C, h, w)
    targets = build_dataset("synthetic", 32, "train", 32, 0).targets
    tok = load_tokenizer(tokenizer_path)
    x, y = torch.cat([s[0] for s in seen]), torch.cat([s[1] for s in seen])
    candidates = cache.transpose(0, 1).reshape(64, -1)                # row = flip * 32 + index
    distances = (tok.denormalize(x).flatten(1)[:, None] - candidates[None]).abs().amax(-1)
    best = distances.argmin(1)
    assert distances.min(1).values.max() < 1e-5                        # every sample is a cached latent, normalised
    flipped, index = best // 32, best % 32
    assert 0 < flipped.sum() < len(flipped)                            # both views are drawn
    assert len(set(index.tolist())) == 32                              # one epoch: each image once
    dropped = y == 10                                                  # the null class
    assert 0 < dropped.sum() < len(y)
    assert torch.equal(y[~dropped], torch.tensor(targets)[index[~dropped]])


#################################################################################
#                              Resume and refusals                              #
#################################################################################

def test_resume_is_exact(tmp_path, tokenizer_path):
    cache = tmp_path / "cache"
    train(tokenizer_path, tmp_path / "once", "--cache-dir", cache, steps=6)
    train(tokenizer_path, tmp_path / "split", "--cache-dir", cache, steps=3)
    train(tokenizer_path, tmp_path / "split", "--cache-dir", cache, "--resume", steps=6)
    once = torch.load(tmp_path / "once" / "checkpoint.pt", weights_only=True)
    split = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
    assert once["step"] == split["step"] == 6
    for key in ("model", "ema"):
        for name, value in once[key].items():
            assert torch.equal(value, split[key][name]), f"{key}.{name} differs after resume"
    for name, value in once["optimizer"]["state"][0].items():
        assert torch.equal(value, split["optimizer"]["state"][0][name])
    assert torch.equal(once["rng"][0]["torch"], split["rng"][0]["torch"])
    strip = lambda records: [{k: v for k, v in r.items() if k != "sec_per_step"} for r in records]
    assert [r["step"] for r in read_metrics(tmp_path / "split")] == [1, 2, 3, 4, 5, 6]
    assert strip(read_metrics(tmp_path / "once")) == strip(read_metrics(tmp_path / "split"))


def test_existing_checkpoint_is_refused_and_untouched(tmp_path, tokenizer_path):
    out = tmp_path / "run"
    train(tokenizer_path, out, steps=2)
    before = {name: (out / name).read_bytes() for name in ("checkpoint.pt", "metrics.jsonl", "samples.png")}
    with pytest.raises(SystemExit, match=r"^error: .*checkpoint.pt exists; pass --resume"):
        train(tokenizer_path, out, steps=4)
    assert {name: (out / name).read_bytes() for name in before} == before
    # --resume with another model, or with a tokenizer whose latents differ, is refused too.
    with pytest.raises(SystemExit, match=r"^error: --resume continues .*checkpoint.pt exactly, but .*--depth 2"):
        train(tokenizer_path, out, "--resume", "--depth", 2, steps=4)
    tok = load_tokenizer(tokenizer_path)
    with torch.no_grad():
        tok.adapter.apply(lambda m: m.weight.mul_(1.5) if isinstance(m, torch.nn.Linear) else None)
    save_tokenizer(tok, tokenizer_path)
    with pytest.raises(SystemExit, match=r"^error: the checkpoint in .* was trained on other latents"):
        train(tokenizer_path, out, "--resume", steps=4)
    assert {name: (out / name).read_bytes() for name in before} == before
    assert len(glob.glob(str(out / "latents" / "latents-*"))) == 2       # no new cache was started

    # What evaluate.py reads from the checkpoint.
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert {"model_config", "model", "ema", "optimizer", "step", "args", "rng", "skipped",
            "num_classes"} <= set(checkpoint)
    assert checkpoint["num_classes"] == 10 and checkpoint["skipped"] == 0
    assert checkpoint["args"]["tokenizer"] == os.path.abspath(tokenizer_path)
    model, _ = load_dit(str(out / "checkpoint.pt"))
    assert model.config == dict(input_size=4, patch_size=1, in_channels=4, hidden_size=32, depth=1, num_heads=2,
                                mlp_ratio=4.0, num_classes=10, qk_norm=False, use_rope=True)
    # samples.png: one row per class (10) of --sample-columns (2) 32 px images, 2 px padding.
    from PIL import Image
    with Image.open(out / "samples.png") as grid:
        assert grid.size == (2 * 34 + 2, 10 * 34 + 2)


def test_bad_tokenizer_is_one_error_line(tmp_path):
    stage0 = str(tmp_path / "stage0.pt")
    torch.save({"stage": 0, "encoder_name": "dinov2_vits14", "ema": {}}, stage0)
    with pytest.raises(SystemExit, match=r"^error: --tokenizer: .*stage0.pt is not a tokenizer checkpoint"):
        train(stage0, tmp_path / "run")
    assert not (tmp_path / "run").exists()


#################################################################################
#                           Learning and non-finite steps                       #
#################################################################################

def test_tiny_model_loss_falls(tmp_path, tokenizer_path):
    train(tokenizer_path, tmp_path / "run", "--num-images", 16, "--batch-size", 16, "--depth", 2,
          "--hidden-size", 64, "--lr", 3e-3, "--log-every", 10, "--label-dropout", 0, steps=80)
    losses = [r["loss"] for r in read_metrics(tmp_path / "run")]
    assert len(losses) == 8
    # The first window holds the steps where the zero-initialised output layer still predicts 0.
    assert losses[-1] < losses[1] * 0.7 < losses[0] * 0.7, losses


def test_nonfinite_loss_is_skipped_and_counted(tmp_path, tokenizer_path, monkeypatch):
    calls = []
    original = train_diffusion.flow_loss

    def nan_on_second_call(*args, **kwargs):
        calls.append(1)
        loss, parts = original(*args, **kwargs)
        return (loss * float("nan") if len(calls) == 2 else loss), parts
    monkeypatch.setattr(train_diffusion, "flow_loss", nan_on_second_call)
    train(tokenizer_path, tmp_path / "run", steps=4)
    records = read_metrics(tmp_path / "run")
    assert [r["skipped"] for r in records] == [0, 1, 1, 1]
    assert records[1]["loss"] is None and all(r["loss"] is not None for r in records[2:])
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert checkpoint["skipped"] == 1 and checkpoint["step"] == 4
    assert all(torch.isfinite(v).all() for key in ("model", "ema") for v in checkpoint[key].values())
    assert all(state["step"].item() == 3 for state in checkpoint["optimizer"]["state"].values())  # 3 updates
