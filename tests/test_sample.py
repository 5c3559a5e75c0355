"""Tests for sample.py: class-balanced, seeded, sharded and resumable sample batches, and
the PNG grid of chosen classes. Tiny random models on CPU."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import sample


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_checkpoints(tmp_path):
    """A small tokenizer and DiT saved as their training scripts save them."""
    import dit
    from tokenizer import AlignTok
    torch.manual_seed(0)
    tok = AlignTok(encoder_name="dinov2_vits14",
                   encoder_overrides=dict(depth=1, embed_dim=32, num_heads=2, patch_size=4, img_size=32),
                   latent_channels=4, decoder_width=32, decoder_multipliers=(1, 1, 1), decoder_res_blocks=1,
                   image_size=32, encoder_size=32)
    with torch.no_grad():
        tok.latent_mean.copy_(torch.tensor([0.5, -0.5, 1.0, 0.0]))
        tok.latent_std.copy_(torch.tensor([2.0, 0.5, 1.0, 3.0]))
    tok_path = str(tmp_path / "tok.pt")
    torch.save({"tokenizer_config": tok.config, "ema": tok.state_dict()}, tok_path)
    model = dit.LightningDiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2,
                             num_classes=3)
    with torch.no_grad():                            # the zero init would output v = 0
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    dit_path = str(tmp_path / "dit.pt")
    torch.save({"model_config": model.config, "ema": model.state_dict(), "args": {"tokenizer": tok_path}}, dit_path)
    return tok.eval(), model.eval(), tok_path, dit_path


def test_sample_end_to_end(tmp_path, monkeypatch):
    import dit
    tok, model, tok_path, dit_path = tiny_checkpoints(tmp_path)
    out = str(tmp_path / "samples.npz")
    args = ["--ckpt", dit_path, "--num", "7", "--out", out, "--steps", "2", "--batch-size", "2",
            "--shard-size", "3", "--seed", "5", "--cfg-scale", "1.5", "--device", "cpu"]
    sample.main(args)
    with np.load(out) as f:
        images, labels = f["arr_0"], f["arr_1"]
    assert images.shape == (7, 32, 32, 3) and images.dtype == np.uint8
    assert labels.tolist() == [0, 1, 2, 0, 1, 2, 0]                    # class-balanced
    # Sample 4 by hand: its noise depends only on (seed, index).
    noise = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed((5 << 32) + 4))
    with torch.no_grad():
        x = dit.sample(model, noise[None], torch.tensor([1]), steps=2, cfg_scale=1.5)
        image = tok.decode(x * tok.latent_std.view(1, -1, 1, 1) + tok.latent_mean.view(1, -1, 1, 1))
    expected = torch.clamp(127.5 * image + 128, 0, 255).to(torch.uint8)[0].permute(1, 2, 0).numpy()
    assert np.abs(images[4].astype(int) - expected).max() <= 1
    assert images.std() > 1

    # Resume: only the missing shard is made again, and the result is the same.
    shards = sample.shard_folder(out)
    os.remove(os.path.join(shards, "shard_000001.npz"))
    made = []
    original = sample.sample_images
    monkeypatch.setattr(sample, "sample_images", lambda m, t, idx, *a: made.append(idx) or original(m, t, idx, *a))
    sample.main(args)
    assert made == [[3, 4], [5]]
    with np.load(out) as f:
        assert np.array_equal(f["arr_0"], images)
    with pytest.raises(SystemExit, match="seed"):
        sample.main([a if a != "5" else "6" for a in args])


def test_grid_of_chosen_classes(tmp_path):
    _, _, _, dit_path = tiny_checkpoints(tmp_path)
    grid = str(tmp_path / "grid.png")
    sample.main(["--ckpt", dit_path, "--grid", grid, "--classes", "2", "0", "--per-class", "3", "--steps", "2",
                 "--device", "cpu"])
    with Image.open(grid) as image:
        assert image.size == (3 * 32 + 4 * 2, 2 * 32 + 3 * 2)
        pixels = np.asarray(image)
    assert pixels.std() > 1
    with pytest.raises(SystemExit, match="--classes"):
        sample.main(["--ckpt", dit_path, "--grid", grid, "--classes", "3", "--device", "cpu"])
