"""What a long tokenizer run meets late, checked in a few steps: the GAN under compile, the
discriminator across stages and resumes, extension of finished runs, non-finite steps,
refused flags; and tests that turn red when a part is swapped for a plausible wrong one
(learning rates, EMA, latent statistics, w_sp, the adaptive weight, the encoder resize)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import train_tokenizer
from data import build_dataset
from losses import PatchDiscriminator, adaptive_weight, generator_loss
from tokenizer import AlignTok, encoder_input
from training import clip_gradients
from test_tokenizer import TINY_ENCODER, TINY_TOKENIZER, metrics, part, run_stage

pytestmark = pytest.mark.usefixtures("one_thread")
GAN = ["--disc-weight", "0.5", "--disc-start", "1", "--disc-layers", "2"]


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    root = tmp_path_factory.mktemp("long")
    run_stage(0, root / "s0", *TINY_ENCODER, steps=2)
    return root, ["--encoder-weights", str(root / "s0" / "checkpoint.pt"), *TINY_TOKENIZER]


def state_equal(a, b):
    """Nested checkpoint values (tensors, dicts, lists, numbers) bit for bit."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(state_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(state_equal(x, y) for x, y in zip(a, b))
    return a == b


#################################################################################
#                              GAN, compile, stages                             #
#################################################################################

@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_with_the_gan_and_adaptive_weight(stand_in, tmp_path, backend):
    root, stage1 = stand_in
    eager = run_stage(1, tmp_path / "eager", *stage1, *GAN, steps=2)
    compiled = run_stage(1, tmp_path / "compiled", *stage1, *GAN, "--compile", "--compile-backend", backend, steps=2)
    records, reference = metrics(tmp_path / "compiled"), metrics(tmp_path / "eager")
    assert "lambda" in records[1] and np.isfinite(records[1]["lambda"]) and records[1]["lambda"] > 0
    for key in ("loss", "lambda", "d_loss"):
        assert records[1][key] == pytest.approx(reference[1][key], rel=1e-3), key
    assert compiled["model"].keys() == eager["model"].keys()          # compiled in place: same names


def test_discriminator_carries_over_between_stages(stand_in, tmp_path):
    root, stage1 = stand_in
    first = run_stage(1, tmp_path / "s1", *stage1, *GAN, steps=3)
    assert first["gan_start"] == 1
    carried = run_stage(2, tmp_path / "s2", "--init", str(tmp_path / "s1" / "checkpoint.pt"), *GAN, steps=2)
    records = metrics(tmp_path / "s2")
    assert carried["gan_start"] == 0 and "gan" in records[0]           # on from the first step
    disc_steps = lambda c: next(iter(c["disc_optimizer"]["state"].values()))["step"].item()
    assert disc_steps(first) == 2 and disc_steps(carried) == 2 + 2     # the optimiser carried too
    fresh = run_stage(2, tmp_path / "fresh", "--init", str(tmp_path / "s1" / "checkpoint.pt"), *GAN,
                      "--fresh-discriminator", steps=3)
    assert fresh["gan_start"] == 1 and disc_steps(fresh) == 2
    assert "gan" not in metrics(tmp_path / "fresh")[0]


def test_gan_starting_in_an_extension_and_resume_keeps_the_discriminator(stand_in, tmp_path):
    root, stage1 = stand_in
    gan = ["--disc-weight", "0.5", "--disc-start", "4", "--disc-layers", "2"]
    short = run_stage(1, tmp_path / "run", *stage1, *gan, steps=3)
    assert "discriminator" in short                                   # made before it is needed
    extended = run_stage(1, tmp_path / "run", *stage1, *gan, "--resume", steps=6)
    records = metrics(tmp_path / "run")
    assert "gan" not in records[3] and "gan" in records[4] and extended["step"] == 6
    with pytest.raises(SystemExit, match="--disc-weight 0.0 .*the run has 0.5"):
        run_stage(1, tmp_path / "run", *stage1, *gan, "--disc-weight", "0", "--resume", steps=8)
    assert state_equal(torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True), extended)


def test_start_up_refusals_before_any_work(stand_in, tmp_path, capsys):
    root, stage1 = stand_in
    out = tmp_path / "bad"
    with pytest.raises(SystemExit, match="--disc-layers 3 has no output on 16 px"):
        run_stage(1, out, *stage1, "--disc-weight", "0.5", "--disc-layers", "3")
    for flags, message in ((["--perceptual-weight", "1"], "--vgg-weights .*--lpips-weights"),
                           (["--stats-images", "0"], "--stats-images"),
                           (["--grad-clip", "-1"], "--grad-clip"),
                           (["--stage", "4"], "--stage")):
        with pytest.raises(SystemExit):
            run_stage(1, out, *stage1, *flags)
        assert re_search(message, capsys.readouterr().err), flags
    assert not out.exists()


def re_search(pattern, text):
    import re
    return re.search(pattern, text) is not None


def test_resume_refuses_flags_that_change_the_run(stand_in, tmp_path):
    root, stage1 = stand_in
    run_stage(1, tmp_path / "run", *stage1, steps=2)
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    for flags, name in ((["--seed", "1"], "--seed 1"), (["--lr", "0.5"], "--lr 0.5"),
                        (["--data", str(tmp_path)], "--data")):
        with pytest.raises(SystemExit, match=f"flags differ: .*{name}"):
            run_stage(1, tmp_path / "run", *stage1, *flags, "--resume", steps=4)
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before
    run_stage(1, tmp_path / "run", *stage1, "--resume", "--log-every", "2", steps=3)   # safe to change


@pytest.mark.parametrize("stage", [2, 3])
def test_extending_a_finished_run_is_exact(stand_in, tmp_path, stage):
    root, stage1 = stand_in
    run_stage(1, tmp_path / "s1", *stage1, steps=2)
    init = tmp_path / "s1" / "checkpoint.pt"
    if stage == 3:
        run_stage(2, tmp_path / "s2", "--init", str(init), steps=2)
        init = tmp_path / "s2" / "checkpoint.pt"
    once = run_stage(stage, tmp_path / "once", "--init", str(init), steps=4)
    run_stage(stage, tmp_path / "split", "--init", str(init), steps=2)
    split = run_stage(stage, tmp_path / "split", "--init", str(init), "--resume", steps=4)
    for key in ("model", "ema", "optimizer", "rng", "step"):
        assert state_equal(once[key], split[key]), key


#################################################################################
#                           Gradients and non-finite steps                      #
#################################################################################

def test_grad_clip_zero_means_no_clipping(stand_in, tmp_path):
    layer = torch.nn.Linear(3, 2)
    layer(torch.ones(1, 3)).sum().mul(100).backward()
    grads = [p.grad.clone() for p in layer.parameters()]
    norm = clip_gradients(layer.parameters(), 0)
    assert norm > 1 and all(torch.equal(p.grad, g) for p, g in zip(layer.parameters(), grads))
    clip_gradients(layer.parameters(), 1.0)
    assert torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in layer.parameters()])) == pytest.approx(1)
    root, stage1 = stand_in
    start = run_stage(1, tmp_path / "zero", *stage1, "--grad-clip", "0", steps=1)
    moved = [k for k in part(start["model"], "decoder.") if not torch.equal(start["model"][k], start["ema"][k])]
    assert moved, "with --grad-clip 0 the decoder must still learn"


def test_non_finite_steps_are_skipped_counted_and_stop_the_run(stand_in, tmp_path, monkeypatch):
    root, stage1 = stand_in
    original, calls = train_tokenizer.tokenizer_loss, []

    def nan_on(steps):
        def loss(*args, **kwargs):
            calls.append(1)
            value, reconstruction, logs = original(*args, **kwargs)
            return (value * float("nan") if len(calls) in steps else value), reconstruction, logs
        return loss

    monkeypatch.setattr(train_tokenizer, "tokenizer_loss", nan_on({2}))
    checkpoint = run_stage(1, tmp_path / "once", *stage1, steps=3)
    assert checkpoint["skipped"] == 1 and [r["skipped"] for r in metrics(tmp_path / "once")] == [0, 1, 1]
    assert metrics(tmp_path / "once")[1]["loss"] is None
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values() if v.is_floating_point())
    # Two bad steps in a row with --max-bad-steps 2: stop without saving; the checkpoint of
    # step 2 (its batch skipped, the weights those of step 1) stays as it was.
    calls.clear()
    monkeypatch.setattr(train_tokenizer, "tokenizer_loss", nan_on({2, 3}))
    with pytest.raises(SystemExit, match="2 non-finite steps in a row at step 3"):
        run_stage(1, tmp_path / "stop", *stage1, "--max-bad-steps", "2", "--ckpt-every", "1", steps=5)
    stopped = torch.load(tmp_path / "stop" / "checkpoint.pt", weights_only=True)
    assert stopped["step"] == 2 and stopped["skipped"] == 1
    assert all(torch.isfinite(v).all() for v in stopped["model"].values() if v.is_floating_point())


#################################################################################
#                    Tests that fail for a swapped wrong part                   #
#################################################################################

def test_stage2_learning_rates_reach_their_own_parts(stand_in, tmp_path):
    root, stage1 = stand_in
    run_stage(1, tmp_path / "s1", *stage1, steps=2)
    init = torch.load(tmp_path / "s1" / "checkpoint.pt", weights_only=True)["ema"]
    frozen_encoder = run_stage(2, tmp_path / "a", "--init", str(tmp_path / "s1" / "checkpoint.pt"),
                               "--encoder-lr", "0", "--lr", "1e-3", steps=2)["model"]
    frozen_rest = run_stage(2, tmp_path / "b", "--init", str(tmp_path / "s1" / "checkpoint.pt"),
                            "--encoder-lr", "1e-3", "--lr", "0", steps=2)["model"]
    changed = lambda state, prefix: any(not torch.equal(state[k], init[k]) for k in part(state, prefix))
    assert not changed(frozen_encoder, "encoder.") and changed(frozen_encoder, "decoder.")
    assert changed(frozen_rest, "encoder.") and not changed(frozen_rest, "decoder.") \
        and not changed(frozen_rest, "adapter.")


def test_tokenizer_ema_moves_with_its_decay(stand_in, tmp_path):
    root, stage1 = stand_in
    ema = ["--ema-decay", "0.5", "--ema-warmup", "0"]
    first = run_stage(1, tmp_path / "run", *stage1, *ema, steps=1)
    second = run_stage(1, tmp_path / "run", *stage1, *ema, "--resume", steps=2)
    moved = 0
    for key, value in part(second["ema"], "decoder.").items():
        torch.testing.assert_close(value, torch.lerp(first["ema"][key], second["model"][key], 0.5))
        moved += not torch.equal(value, first["ema"][key])
    assert moved > 0


def test_latent_statistics_are_the_unbiased_ones_of_the_seeded_subset(stand_in, tmp_path):
    root, stage1 = stand_in
    first = run_stage(1, tmp_path / "s1", *stage1, steps=1)
    assert not torch.equal(first["ema"]["latent_std"], torch.ones_like(first["ema"]["latent_std"]))  # stage 1 too
    checkpoint = run_stage(2, tmp_path / "s2", "--init", str(tmp_path / "s1" / "checkpoint.pt"), steps=1)
    tokenizer = AlignTok(**checkpoint["tokenizer_config"])
    tokenizer.load_state_dict(checkpoint["ema"])
    dataset = build_dataset("synthetic", 16, "train", 64, 0)
    chosen = torch.randperm(64, generator=torch.Generator().manual_seed(0))[:32]       # --stats-images 32
    with torch.no_grad():
        z = tokenizer.eval().encode(torch.stack([dataset[i][0] for i in chosen.tolist()])).double()
    z = z.transpose(0, 1).flatten(1)                                                   # (C, N*h*w)
    torch.testing.assert_close(checkpoint["ema"]["latent_mean"], z.mean(1).float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(checkpoint["ema"]["latent_std"], z.std(1).float(), rtol=1e-5, atol=1e-6)


def test_sp_weight_scales_the_preservation_term(stand_in, tmp_path):
    root, stage1 = stand_in
    run_stage(1, tmp_path / "s1", *stage1, steps=1)
    run_stage(2, tmp_path / "s2", "--init", str(tmp_path / "s1" / "checkpoint.pt"), "--sp-weight", "5", steps=3)
    record = metrics(tmp_path / "s2")[2]
    assert record["sp"] > 1e-6
    assert record["loss"] == pytest.approx(record["l1"] + 5 * record["sp"], rel=1e-5)


def test_adaptive_weight_balances_the_whole_reconstruction_loss():
    """lambda is taken from L1 + w_p * LPIPS (+ w_sp L_sp, which does not reach the decoder),
    not from L1 alone: checked by hand with a perceptual stand-in."""
    torch.manual_seed(0)
    tokenizer = AlignTok("dinov2_vits14", dict(depth=1, embed_dim=32, num_heads=2, patch_size=4, img_size=16),
                         latent_channels=4, decoder_width=16, decoder_multipliers=(1, 2, 2), decoder_res_blocks=0,
                         image_size=16, encoder_size=16)
    perceptual = lambda x, y: ((x - y) ** 2).mean(dim=(1, 2, 3)) * 30        # (N,)
    discriminator = PatchDiscriminator(n_layers=1, norm="none")
    images = torch.stack([build_dataset("synthetic", 16)[i][0] for i in range(4)])
    args = train_tokenizer.parse_args(["--stage", "1", "--out", "x", "--perceptual-weight", "2",
                                       "--vgg-weights", __file__, "--lpips-weights", __file__])   # not read here
    _, _, logs = train_tokenizer.tokenizer_loss(args, tokenizer, tokenizer, images, perceptual, None, discriminator)
    reconstruction = tokenizer(images)[0]
    nll = (reconstruction - images).abs().mean() + 2 * perceptual(reconstruction, images).mean()
    expected = adaptive_weight(nll, generator_loss(discriminator(reconstruction)), tokenizer.decoder.last_layer)
    l1_only = adaptive_weight((reconstruction - images).abs().mean(), generator_loss(discriminator(reconstruction)),
                              tokenizer.decoder.last_layer)
    assert logs["lambda"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert abs(expected.item() - l1_only.item()) > 1e-3 * expected.item()     # the test can tell them apart


def test_encoder_input_resize_is_bicubic_with_antialias_as_pil():
    """256 -> 224 in the paper; here 32 -> 28: our resize against Pillow's bicubic (which
    antialiases when shrinking), channel by channel in float."""
    rng = np.random.default_rng(0)
    image = rng.random((32, 32, 3)).astype(np.float32)
    expected = np.stack([np.asarray(Image.fromarray(image[..., c], mode="F").resize((28, 28), Image.BICUBIC))
                         for c in range(3)])
    ours = encoder_input(torch.from_numpy(image).permute(2, 0, 1)[None] * 2 - 1, 28)[0]
    std = torch.tensor((0.229, 0.224, 0.225)).view(3, 1, 1)
    mean = torch.tensor((0.485, 0.456, 0.406)).view(3, 1, 1)
    ours = (ours * std + mean).numpy()
    assert np.abs(ours - expected).max() < 2e-3
    nearest = F.interpolate(torch.from_numpy(image).permute(2, 0, 1)[None], size=(28, 28), mode="nearest")[0]
    assert np.abs(nearest.numpy() - expected).max() > 0.1                  # a wrong resize is visible
