"""Tests for sample.py: class-balanced, seeded, sharded and resumable sample batches, and
the PNG grid of chosen classes. Tiny random models on CPU."""
import json
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
    noise = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed((5 * 0x9E3779B1 + 4) % 2 ** 32))
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
    with np.load(out) as f:                          # what the samples came from travels with them
        recorded = json.loads(str(f["settings"]))
    assert recorded["precision"] == "fp32" and recorded["seed"] == 5 and len(recorded["dit"]) == 64


def test_shards_are_keyed_to_the_weights_not_the_path(tmp_path):
    """train_diffusion.py rewrites one checkpoint.pt as it trains: sampling again after
    training continued must not return the old samples."""
    _, _, tok_path, dit_path = tiny_checkpoints(tmp_path)
    out = str(tmp_path / "samples.npz")
    args = ["--ckpt", dit_path, "--num", "4", "--out", out, "--steps", "1", "--shard-size", "2", "--device", "cpu"]
    sample.main(args)
    checkpoint = torch.load(dit_path, weights_only=True)
    checkpoint["ema"]["y_embedder.embedding_table.weight"] += 1e-3    # training went on
    checkpoint["step"] = 10
    torch.save(checkpoint, dit_path)
    with pytest.raises(SystemExit, match=r"\(dit, dit_step\)"):
        sample.main(args)
    checkpoint["step"] = None                        # the same step number: the weights alone tell
    torch.save(checkpoint, dit_path)
    with pytest.raises(SystemExit, match=r"\(dit\)"):
        sample.main(args)
    tok = torch.load(tok_path, weights_only=True)
    tok["ema"]["latent_std"] = tok["ema"]["latent_std"] * 2
    torch.save(tok, tok_path)
    with pytest.raises(SystemExit, match="tokenizer"):
        sample.main(args)
    for flag, value in (("--precision", "bf16"), ("--cfg-scale", "2"), ("--method", "heun")):
        with pytest.raises(SystemExit, match=flag[2:].replace("-", "_")):
            sample.main(args + [flag, value])


def test_sampling_precision_is_chosen_and_recorded(tmp_path):
    _, _, _, dit_path = tiny_checkpoints(tmp_path)
    results = {}
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        for precision in ("fp32", "tf32", "bf16"):
            out = str(tmp_path / f"{precision}.npz")
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision != "tf32"
            sample.main(["--ckpt", dit_path, "--num", "6", "--out", out, "--steps", "2", "--device", "cpu",
                         "--precision", precision])
            assert torch.backends.cuda.matmul.allow_tf32 == torch.backends.cudnn.allow_tf32 == (precision == "tf32")
            with np.load(out) as f:
                results[precision] = f["arr_0"].astype(int)
                assert json.loads(str(f["settings"]))["precision"] == precision
            with open(os.path.join(sample.shard_folder(out), "settings.json")) as f:
                assert json.load(f)["precision"] == precision
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    assert np.array_equal(results["fp32"], results["tf32"])          # TF32 is a CUDA mode: no change on CPU
    difference = np.abs(results["bf16"] - results["fp32"])
    assert difference.max() > 0 and difference.mean() < 8              # bfloat16 arithmetic, same images


def test_merge_holds_one_shard_in_memory(tmp_path):
    import tracemalloc
    rng = np.random.default_rng(0)
    shards = []
    for s in range(6):                              # 6 shards of 1.2 MB
        path = str(tmp_path / f"shard_{s}.npz")
        np.savez(path, arr_0=rng.integers(0, 256, (100, 64, 64, 3), dtype=np.uint8), arr_1=np.arange(100) + s)
        shards.append(path)
    out = str(tmp_path / "samples.npz")
    tracemalloc.start()
    sample.merge_shards(shards, out, {"seed": 0})
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 3 * 100 * 64 * 64 * 3                 # the batch is 6 shards; at most a few in memory
    expected = [np.load(p) for p in shards]
    with np.load(out) as f:
        assert np.array_equal(f["arr_0"], np.concatenate([e["arr_0"] for e in expected]))
        assert np.array_equal(f["arr_1"], np.concatenate([e["arr_1"] for e in expected]))
        assert json.loads(str(f["settings"])) == {"seed": 0}
    from evaluate import iter_npz_array
    assert np.array_equal(np.concatenate(list(iter_npz_array(out, "arr_0", 64))), np.load(out)["arr_0"])


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


def test_trajectory_ends_at_the_sample_of_the_same_seed_and_label(tmp_path):
    """Its last column is --grid's sample of the same seed and label; its first, by hand, the
    clean image predicted from the noise at t = 0 (x_0 + v; guidance is off below 0.1)."""
    import dit
    tok, _, _, dit_path = tiny_checkpoints(tmp_path)
    checkpoint = torch.load(dit_path, weights_only=True)
    checkpoint["ema"] = {k: v * 6 if v.is_floating_point() else v for k, v in checkpoint["ema"].items()}
    torch.save(checkpoint, dit_path)                 # a DiT whose velocity changes along the path
    model = dit.load_dit(dit_path)[0]
    flags = ["--ckpt", dit_path, "--classes", "2", "0", "--steps", "4", "--method", "heun", "--seed", "3",
             "--cfg-scale", "1.5", "--device", "cpu"]
    trajectory, grid = str(tmp_path / "trajectory.png"), str(tmp_path / "grid.png")
    sample.main([*flags, "--trajectory", trajectory, "--trajectory-columns", "3"])
    sample.main([*flags, "--grid", grid, "--per-class", "1"])
    with Image.open(trajectory) as image, Image.open(grid) as reference:
        path, final = np.asarray(image).astype(int), np.asarray(reference).astype(int)
    assert path.shape == (2 + 2 * 34, 2 + 3 * 34, 3)                  # rows: samples, columns: t
    for row in range(2):
        cell = lambda array, column: array[2 + 34 * row:34 * (row + 1), 2 + 34 * column:34 * (column + 1)]
        assert np.array_equal(cell(path, 2), cell(final, 0))           # t = 1: the sample itself
        noise = sample.sample_noise(3, [row], (4, 8, 8))
        with torch.no_grad():
            x_hat = noise + model(noise, torch.zeros(1), torch.tensor([[2, 0][row]]))
            first = sample.to_uint8(tok.decode(tok.denormalize(x_hat)))[0].astype(int)
        assert np.abs(cell(path, 0) - first).max() <= 1                   # t = 0: the prediction from noise


def test_predicted_clean_image_on_a_point_mass():
    """Data that is one point mu: the exact velocity is v = (mu - x_t) / (1 - t), and the
    prediction from the current state and velocity must be mu at every t of the path."""
    import dit
    mu = torch.tensor([1.5, -0.5, 0.0, 2.0], dtype=torch.float64).view(1, -1, 1, 1)
    field = lambda x, t, y: (mu - x) / (1 - t.view(-1, 1, 1, 1))
    noise = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for method in ("euler", "heun"):
        path = []
        out = dit.sample(field, noise, torch.zeros(3, dtype=torch.long), steps=6, method=method, shift=0.3,
                         trajectory=path)
        times = [t for t, _ in path]
        assert times[0] == 0 and times[-1] == 1 and times == sorted(times) and len(set(times)) == len(times)
        for t, x_hat in path[:-1]:             # (at t = 1 Heun's last evaluation divides by 1 - t = 0)
            torch.testing.assert_close(x_hat, mu.expand_as(noise), rtol=0, atol=1e-12, msg=f"t = {t}")
        assert torch.equal(path[-1][1], out)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torchrun_slowly(tmp_path, module, call, seconds, args, port):
    """Runs `module.call` under torchrun with 2 gloo ranks, each network call first sleeping
    `seconds` (a shard longer than the process-group timeout); returns the finished process."""
    import subprocess
    import sys
    script = tmp_path / f"slow_{module}.py"
    script.write_text(f"import sys, time\nsys.path.insert(0, {ROOT!r})\nimport {module}\n"
                      f"original = {module}.{call}\n"
                      f"def slow(*args, **kwargs):\n    time.sleep({seconds})\n    return original(*args, **kwargs)\n"
                      f"{module}.{call} = slow\n{module}.main(sys.argv[1:])\n")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               str(script), *args]
    return subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          cwd=ROOT, timeout=300)


def test_two_ranks_with_uneven_shards_outlast_a_short_timeout_then_metrics(tmp_path, monkeypatch):
    """3 shards over 2 gloo ranks: rank 0 samples two, rank 1 one, and every shard takes
    longer than the 4 s process-group timeout. A barrier at the end killed the idle rank;
    the file wait does not. The batch is then measured against an ADM-layout reference."""
    import evaluate
    from inception import load_inception
    _, _, _, dit_path = tiny_checkpoints(tmp_path)
    out = str(tmp_path / "samples.npz")
    flags = ["--ckpt", dit_path, "--num-samples", "5", "--shard-size", "2", "--steps", "1", "--device", "cpu"]
    result = torchrun_slowly(tmp_path, "sample", "sample_images", 6, [*flags, "--out", out, "--dist-timeout", "4"],
                             29541)
    assert result.returncode == 0, result.stderr[-3000:]
    single = str(tmp_path / "single.npz")
    sample.main([*flags, "--out", single])                       # the same images from one process
    with np.load(out) as f, np.load(single) as g:
        assert f["arr_0"].shape == (5, 32, 32, 3) and f["arr_1"].tolist() == [0, 1, 2, 0, 1]
        assert np.array_equal(f["arr_0"], g["arr_0"])

    # ADM's reference batch layout: arr_0 images and ADM's statistics, no pool features.
    torch.manual_seed(0)
    weights = str(tmp_path / "inception.pth")
    torch.save(load_inception().state_dict(), weights)
    rng = np.random.default_rng(0)
    ref = str(tmp_path / "VIRTUAL_ref.npz")
    np.savez(ref, arr_0=rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8), mu=np.zeros(2048),
             sigma=np.eye(2048), mu_s=np.zeros(2023), sigma_s=np.eye(2023))
    calls = []                                   # sqrtm of 2048-d covariances is slow: record the calls
    monkeypatch.setattr(evaluate, "frechet_distance", lambda *s: calls.append(s) or float(len(calls)))
    metrics = str(tmp_path / "metrics.json")
    evaluate.main(["metrics", "--samples", out, "--ref", ref, "--inception-weights", weights, "--batch-size", "4",
                   "--device", "cpu", "--out", metrics])
    with open(metrics) as f:
        results = json.load(f)
    assert results["num_samples"] == 5 and results["fid"] == 1.0 and results["sfid"] == 2.0
    assert results["preprocess"] == "adm"
    assert 0 <= results["precision"] <= 1 and 0 <= results["recall"] <= 1 and results["inception_score"] >= 1
    assert np.array_equal(calls[0][2], np.zeros(2048)) and calls[0][0].shape == (2048,)
