"""The AlignTok model and its three-stage training script, run through the command line
on tiny configs (CPU, a few steps each), chained stand-in (0) -> 1 -> 2 -> 3."""
import json

import pytest
import torch

import train_stand_in
import train_tokenizer
from data import build_dataset
from tokenizer import AlignTok, Decoder, load_stand_in, load_tokenizer

TINY_ENCODER = ["--encoder-depth", "1", "--encoder-dim", "32", "--encoder-heads", "2", "--encoder-patch", "4",
                "--encoder-native-size", "16"]
TINY = ["--perceptual-weight", "0", "--disc-weight", "0", "--image-size", "16", "--encoder-size", "16",
        "--num-images", "64", "--batch-size", "8",
        "--log-every", "1", "--sample-every", "2", "--stats-images", "32", "--lr", "1e-3", "--encoder-lr", "1e-3"]
TINY_TOKENIZER = ["--latent-channels", "4", "--decoder-width", "16", "--decoder-multipliers", "1", "2", "2",
                  "--decoder-res-blocks", "0"]


pytestmark = pytest.mark.usefixtures("one_thread")


STAND_IN_TINY = ["--image-size", "16", "--encoder-size", "16", "--num-images", "64", "--batch-size", "8",
                 "--log-every", "1", "--lr", "1e-3"]


def run_stage(stage, out, *extra, steps=4):
    """Stage 0 (the stand-in, train_stand_in.py) or a tokenizer stage, from the command line."""
    if stage == 0:
        train_stand_in.main(train_stand_in.parse_args(["--out", str(out), "--steps", str(steps), *STAND_IN_TINY,
                                                       *extra]))
    else:
        argv = ["--stage", str(stage), "--out", str(out), "--steps", str(steps)] + TINY + list(extra)
        train_tokenizer.main(train_tokenizer.parse_args(argv))
    return torch.load(out / "checkpoint.pt", weights_only=True)


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def part(state, prefix):
    return {k: v for k, v in state.items() if k.startswith(prefix)}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """Runs stages 0-3 once; stage 2 records its frozen reference for inspection."""
    root = tmp_path_factory.mktemp("stages")
    checkpoints = {0: run_stage(0, root / "s0", *TINY_ENCODER, steps=6)}
    checkpoints[1] = run_stage(1, root / "s1", "--encoder-weights", str(root / "s0" / "checkpoint.pt"),
                               *TINY_TOKENIZER)
    captured = {}
    original = AlignTok.frozen_reference

    def capture(tokenizer):
        captured["reference"] = original(tokenizer)
        captured["initial"] = {k: v.clone() for k, v in captured["reference"].state_dict().items()}
        return captured["reference"]

    AlignTok.frozen_reference = capture
    try:
        checkpoints[2] = run_stage(2, root / "s2", "--init", str(root / "s1" / "checkpoint.pt"))
    finally:
        AlignTok.frozen_reference = original
    checkpoints[3] = run_stage(3, root / "s3", "--init", str(root / "s2" / "checkpoint.pt"))
    return root, checkpoints, captured


def test_stage0_trains_a_stand_in_classifier(stages):
    root, checkpoints, _ = stages
    assert checkpoints[0]["stage"] == 0
    classifier = load_stand_in(str(root / "s0" / "checkpoint.pt"))
    images = torch.stack([build_dataset("synthetic", 16)[i][0] for i in range(4)])
    assert classifier(images).shape == (4, 10)
    assert [m["step"] for m in metrics(root / "s0")] == [1, 2, 3, 4, 5, 6]


def test_stage1_leaves_the_encoder_bit_for_bit_unchanged(stages):
    _, checkpoints, _ = stages
    stand_in = {k.removeprefix("encoder."): v for k, v in checkpoints[0]["ema"].items() if k.startswith("encoder.")}
    for weights in ("model", "ema"):
        encoder = {k.removeprefix("encoder."): v for k, v in part(checkpoints[1][weights], "encoder.").items()}
        assert_same(encoder, stand_in)


def test_stage2_reference_is_frozen_and_preservation_starts_at_zero(stages):
    root, checkpoints, captured = stages
    reference = captured["reference"]
    assert not hasattr(reference, "decoder")
    assert all(p.grad is None and not p.requires_grad for p in reference.parameters())
    assert_same(reference.state_dict(), captured["initial"])
    # It is the stage-1 EMA encoder + adapter, while the trained encoder moved away from it.
    stage1 = checkpoints[1]["ema"]
    assert_same(captured["initial"], {k: stage1[k] for k in captured["initial"]})
    assert any(not torch.equal(checkpoints[2]["model"][k], stage1[k]) for k in part(stage1, "encoder."))
    sp = [m["sp"] for m in metrics(root / "s2")]
    assert sp[0] == 0.0 and max(sp[1:]) > 0


def test_stage3_changes_only_the_decoder_and_keeps_latent_statistics(stages):
    _, checkpoints, _ = stages
    before, after = checkpoints[2]["ema"], checkpoints[3]["model"]
    for prefix in ("encoder.", "adapter."):
        assert_same(part(after, prefix), part(before, prefix))
    assert any(not torch.equal(after[k], before[k]) for k in part(before, "decoder."))
    # Statistics are computed after stage 2 and again, unchanged, after stage 3.
    assert not torch.equal(before["latent_std"], torch.ones_like(before["latent_std"]))
    torch.testing.assert_close(checkpoints[3]["ema"]["latent_mean"], before["latent_mean"])
    torch.testing.assert_close(checkpoints[3]["ema"]["latent_std"], before["latent_std"])


def test_load_tokenizer_rebuilds_from_the_checkpoint_alone(stages):
    root, checkpoints, _ = stages
    tokenizer = load_tokenizer(str(root / "s3" / "checkpoint.pt"))
    images = torch.stack([build_dataset("synthetic", 16)[i][0] for i in range(2)])
    with torch.no_grad():
        z = tokenizer.encode(images)
        assert z.shape == (2, 4, 4, 4)
        assert tokenizer.decode(z).shape == (2, 3, 16, 16)
    torch.testing.assert_close(tokenizer.latent_mean, checkpoints[3]["ema"]["latent_mean"])
    assert (root / "s3" / "recon.png").stat().st_size > 0


def test_stages_out_of_order_are_refused(stages, tmp_path):
    root, _, _ = stages
    with pytest.raises(SystemExit, match="must start from a stage-1 checkpoint.*stage 0"):
        run_stage(2, tmp_path / "bad", "--init", str(root / "s0" / "checkpoint.pt"))
    with pytest.raises(SystemExit, match="needs --init"):
        run_stage(3, tmp_path / "bad")
    with pytest.raises(SystemExit, match="needs --encoder-weights"):
        run_stage(1, tmp_path / "bad", *TINY_TOKENIZER)
    assert not (tmp_path / "bad" / "checkpoint.pt").exists()


def test_existing_run_is_not_overwritten_and_resume_is_exact(stages, tmp_path):
    root, _, _ = stages
    args = ("--encoder-weights", str(root / "s0" / "checkpoint.pt"), *TINY_TOKENIZER)
    straight = run_stage(1, tmp_path / "straight", *args, steps=4)
    run_stage(1, tmp_path / "resumed", *args, steps=2)
    before = (tmp_path / "resumed" / "checkpoint.pt").read_bytes()
    with pytest.raises(SystemExit, match="exists; pass --resume"):
        run_stage(1, tmp_path / "resumed", *args, steps=4)
    assert (tmp_path / "resumed" / "checkpoint.pt").read_bytes() == before
    resumed = run_stage(1, tmp_path / "resumed", *args, "--resume", steps=4)
    for weights in ("model", "ema"):
        assert_same(resumed[weights], straight[weights])
    losses = lambda out: [m["loss"] for m in metrics(out)]
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")


def test_tiny_tokenizer_overfits_one_batch():
    torch.manual_seed(0)
    tokenizer = AlignTok("dinov2_vits14", dict(depth=1, embed_dim=32, num_heads=2, patch_size=4, img_size=16),
                         latent_channels=8, decoder_width=32, decoder_multipliers=(1, 2, 2), decoder_res_blocks=1,
                         image_size=16, encoder_size=16)
    images = torch.stack([build_dataset("synthetic", 16)[i][0] for i in range(8)])
    optimizer = torch.optim.Adam(tokenizer.parameters(), lr=2e-3)
    losses = []
    for _ in range(300):
        reconstruction, _, _ = tokenizer(images)
        loss = (reconstruction - images).abs().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 5, (losses[0], losses[-1])


def test_decoder_default_size_and_shapes():
    decoder = Decoder()
    count = sum(p.numel() for p in decoder.parameters())
    assert abs(count - 42e6) / 42e6 < 0.10 and abs(count - 41.4e6) < 0.1e6, count
    with torch.no_grad():
        assert Decoder(4, 16, (1, 2), 1)(torch.randn(1, 4, 8, 8)).shape == (1, 3, 16, 16)


def test_image_size_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="not image_size 32"):
        AlignTok("dinov2_vits14", dict(depth=1, embed_dim=32, num_heads=2, patch_size=4, img_size=16),
                 decoder_multipliers=(1, 2), image_size=32, encoder_size=16)


def test_gan_lpips_and_preservation_ablations_run_through_the_script(stages, tmp_path):
    """The GAN (from step 1, with the adaptive weight), LPIPS from weight files, and the
    semantic preservation variants (cosine; before the adapter) all take part in a step."""
    import torchvision
    from losses import LPIPS
    root, _, _ = stages
    torch.manual_seed(0)
    vgg = torchvision.models.vgg16(weights=None).state_dict()
    heads = {k: torch.rand_like(v) for k, v in LPIPS().heads.state_dict().items()}
    torch.save(vgg, tmp_path / "vgg16.pth")
    torch.save(heads, tmp_path / "lpips_vgg.pth")
    init = str(root / "s1" / "checkpoint.pt")
    run_stage(2, tmp_path / "gan", "--init", init, "--perceptual-weight", "1", "--disc-weight", "0.5", "--disc-start",
              "1", "--disc-layers", "2", "--sp-loss", "cosine", "--sp-placement",
              "features", "--vgg-weights", str(tmp_path / "vgg16.pth"), "--lpips-weights",
              str(tmp_path / "lpips_vgg.pth"), steps=3)
    records = metrics(tmp_path / "gan")
    assert "gan" not in records[0] and {"gan", "lambda", "d_loss", "perceptual", "sp"} <= set(records[1])
    assert all(r["perceptual"] > 0 for r in records) and abs(records[0]["sp"]) < 1e-6 and records[2]["sp"] > 1e-6
    checkpoint = torch.load(tmp_path / "gan" / "checkpoint.pt", weights_only=True)
    assert "discriminator" in checkpoint and checkpoint["args"]["sp_placement"] == "features"


def test_stage1_takes_dinov2_weights_from_a_safetensors_file(tmp_path):
    from safetensors.torch import save_file
    from tokenizer import load_dinov2
    torch.manual_seed(0)
    encoder = load_dinov2("dinov2_vits14", depth=1, embed_dim=32, num_heads=2, patch_size=4, img_size=16)
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, str(tmp_path / "model.safetensors"))
    checkpoint = run_stage(1, tmp_path / "s1", "--encoder-weights", str(tmp_path / "model.safetensors"),
                           *TINY_ENCODER, *TINY_TOKENIZER, steps=2)
    assert_same({k.removeprefix("encoder."): v for k, v in part(checkpoint["model"], "encoder.").items()},
                encoder.state_dict())


def test_two_processes_with_torchrun_and_gloo(stages, tmp_path):
    """Stage 2 (everything trainable, GAN on) under torchrun with DDP on CPU: the ranks
    stay in step and the checkpoint holds both ranks' RNG states."""
    import os
    import subprocess
    import sys
    root, _, _ = stages
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
               "train_tokenizer.py", "--stage", "2", "--out", str(out), "--steps", "3", "--init",
               str(root / "s1" / "checkpoint.pt"), *TINY, "--disc-weight", "0.5", "--disc-start", "1",
               "--disc-layers", "2", "--batch-size", "4"]
    result = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == 3 and len(checkpoint["rng"]) == 2
    assert not torch.equal(checkpoint["rng"][0]["torch"], checkpoint["rng"][1]["torch"])
    with pytest.raises(SystemExit, match="written by 2 process"):
        run_stage(2, out, "--init", str(root / "s1" / "checkpoint.pt"), "--batch-size", "4", "--resume", steps=4)
