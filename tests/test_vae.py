"""vae.py against diffusers' AutoencoderKL (test-only dependency) under seeded random
weights: folders written by diffusers' save_pretrained load strictly into our model and
encode and decode as diffusers does; the KL term against torch.distributions; the key map
and the loader's errors. Small widths and images, CPU only."""
import json
import os

import pytest
import torch
from torch.distributions import Normal, kl_divergence

diffusers = pytest.importorskip("diffusers")

from losses import kl_loss                                               # noqa: E402
from vae import AutoencoderKL, DiagonalGaussian, load_autoencoder_kl, load_tokenizer_or_vae  # noqa: E402

TOL = dict(rtol=0, atol=1e-4)

# Small versions of the layouts that matter: every block type diffusers' VAE has (attention
# in the lowest level of both paths, shortcut convs, quant convs), SD-VAE's (four levels,
# multipliers 1, 2, 4, 4, latent 4) and FLUX.1's (latent 16, no quant convs, a shift).
CONFIGS = {
    "every_block": dict(block_out_channels=(32, 64), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
                        up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D")),
    "sd": dict(block_out_channels=(32, 64, 128, 128), layers_per_block=2, latent_channels=4,
               down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
               scaling_factor=0.18215),
    "flux": dict(block_out_channels=(32, 64, 128, 128), layers_per_block=2, latent_channels=16,
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                 use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159),
}


def diffusers_vae(name, seed=0):
    """diffusers' AutoencoderKL with every parameter perturbed, so that GroupNorm scales and
    biases are not the identity (a swapped norm key would otherwise go unseen)."""
    torch.manual_seed(seed)
    model = diffusers.AutoencoderKL(**CONFIGS[name]).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def saved(model, folder):
    model.save_pretrained(str(folder))
    return str(folder)


def images(n=2, size=32, seed=1):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def rewrite_weights(folder, edit):
    """Applies edit(state) to the folder's safetensors file (diffusers' own writer)."""
    from safetensors.torch import load_file, save_file
    path = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    state = load_file(path)
    edit(state)
    save_file({k: v.contiguous() for k, v in state.items()}, path)


#################################################################################
#                              Parity with diffusers                            #
#################################################################################

@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_encode_and_decode_match_diffusers(name, tmp_path, one_thread):
    theirs = diffusers_vae(name)
    ours = load_autoencoder_kl(saved(theirs, tmp_path / name), image_size=32)
    x = images()
    with torch.no_grad():
        posterior = theirs.encode(x).latent_dist
        mine = ours.posterior(x)
        torch.testing.assert_close(mine.mean, posterior.mean, **TOL)
        torch.testing.assert_close(mine.logvar, posterior.logvar, **TOL)
        torch.testing.assert_close(ours.encode(x), posterior.mode(), **TOL)
        z = posterior.sample(generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(ours.decode(z), theirs.decode(z).sample, **TOL)
    assert ours.grid_size == tuple(posterior.mean.shape[-2:])


@pytest.mark.parametrize("conv_shaped", [False, True])
def test_old_style_attention_keys_load(conv_shaped, tmp_path, one_thread):
    """Folders converted before diffusers 0.15 name the attention query/key/value/proj_attn;
    LDM's attention holds them as 1x1 convs, weights (C, C, 1, 1)."""
    theirs = diffusers_vae("every_block")
    folder = saved(theirs, tmp_path / "old")
    renames = {"to_q.": "query.", "to_k.": "key.", "to_v.": "value.", "to_out.0.": "proj_attn."}

    def to_old_names(state):
        for key in [k for k in state if ".attentions." in k]:
            new = key
            for a, b in renames.items():
                new = new.replace(a, b)
            value = state.pop(key)
            state[new] = value[..., None, None] if conv_shaped and value.ndim == 2 else value
    rewrite_weights(folder, to_old_names)
    ours = load_autoencoder_kl(folder, image_size=32)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x), theirs.encode(x).latent_dist.mean, **TOL)
        torch.testing.assert_close(ours.decode(ours.encode(x)), theirs.decode(ours.encode(x)).sample, **TOL)


def test_posterior_matches_diffusers_on_extreme_moments():
    """The clamp of logvar to [-30, 20], std = exp(logvar / 2), the sample and the KL as
    diffusers' DiagonalGaussianDistribution (KL summed over C, h, w, here averaged over images)."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    moments = torch.randn(3, 8, 4, 5, generator=torch.Generator().manual_seed(0))
    moments[:, 4:] *= 30                                             # logvar beyond both clamps
    theirs = DiagonalGaussianDistribution(moments)
    ours = DiagonalGaussian(moments)
    assert ours.logvar.min() == -30 and ours.logvar.max() == 20
    torch.testing.assert_close(ours.logvar, theirs.logvar)
    torch.testing.assert_close(ours.std, theirs.std)
    torch.testing.assert_close(ours.sample(torch.Generator().manual_seed(1)),
                               theirs.sample(torch.Generator().manual_seed(1)))
    moderate = DiagonalGaussian(moments / 30)
    torch.testing.assert_close(moderate.kl(), DiagonalGaussianDistribution(moments / 30).kl().mean())


def test_scaling_and_shift_factor_are_the_latent_statistics(tmp_path):
    """normalize() gives what diffusers pipelines feed the denoiser: (z - shift) * scale, and
    with latents_mean / latents_std (z - mean) * scale / std."""
    theirs = diffusers_vae("flux")
    ours = load_autoencoder_kl(saved(theirs, tmp_path / "flux"), image_size=32)
    z = torch.randn(2, 16, 4, 4)
    torch.testing.assert_close(ours.normalize(z), (z - 0.1159) * 0.3611)
    torch.testing.assert_close(ours.denormalize(ours.normalize(z)), z)
    folder = str(tmp_path / "flux")
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    mean, std = torch.linspace(-1, 1, 16), torch.linspace(0.5, 2, 16)
    config.update(latents_mean=mean.tolist(), latents_std=std.tolist())
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    ours = load_autoencoder_kl(folder, image_size=32)
    view = lambda t: t.view(1, -1, 1, 1)                             # noqa: E731
    torch.testing.assert_close(ours.normalize(z), (z - view(mean)) * 0.3611 / view(std))


def test_recon_of_a_diffusers_folder_has_diffusers_psnr(tmp_path, one_thread):
    """evaluate.py recon on the folder (load_tokenizer_or_vae's dispatch, 256 px images) against
    diffusers' own encode (posterior mean) and decode on the same images, measured alike."""
    from data import build_dataset
    from evaluate import main
    from tokenizer import load_dinov2
    from training import psnr
    theirs = diffusers_vae("sd")
    folder = saved(theirs, tmp_path / "sd")
    assert isinstance(load_tokenizer_or_vae(folder), AutoencoderKL)
    dinov2 = str(tmp_path / "dinov2.pth")                            # random FD_DINOv2 features: only PSNR counts
    torch.save(load_dinov2("dinov2_vits14").state_dict(), dinov2)
    out = str(tmp_path / "recon.json")
    main(["recon", "--tokenizer", folder, "--data", "synthetic", "--num-images", "4", "--batch-size", "4",
          "--workers", "0", "--device", "cpu", "--dinov2", "dinov2_vits14", "--dinov2-weights", dinov2,
          "--dinov2-size", "28", "--out", out])
    with open(out) as f:
        results = json.load(f)
    dataset = build_dataset("synthetic", 256, split="val", num_images=4)
    x = (torch.stack([dataset[i][0] for i in range(4)]) + 1) / 2     # (4, 3, 256, 256) in [0, 1]
    with torch.no_grad():
        z = theirs.encode(2 * x - 1).latent_dist.mode()
        recon = torch.round(((theirs.decode(z).sample + 1) / 2).clamp(0, 1) * 255) / 255
    expected = psnr(x, recon).mean().item()
    assert results["num_images"] == 4 and abs(results["psnr"] - expected) < 1e-3, (results["psnr"], expected)


#################################################################################
#                                  The KL term                                  #
#################################################################################

def test_kl_loss_is_the_per_image_sum_averaged_over_the_batch():
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(3, 4, 5, 6, generator=g), torch.randn(3, 4, 5, 6, generator=g)
    mean[0] *= 3                                                     # images differ: a wrong axis shows
    reference = kl_divergence(Normal(mean, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).sum(dim=(1, 2, 3)).mean()
    torch.testing.assert_close(kl_loss(mean, logvar), reference)
    # By hand: one image, one position, mean 1, variance e (logvar 1): 0.5 * (1 + e - 1 - 1).
    one = kl_loss(torch.ones(1, 1, 1, 1), torch.ones(1, 1, 1, 1))
    torch.testing.assert_close(one, torch.tensor(0.5 * (torch.e - 1)))
    assert kl_loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)) == 0


#################################################################################
#                          Key map and the loader's errors                       #
#################################################################################

def test_a_dropped_block_is_named_by_the_strict_load(tmp_path):
    folder = saved(diffusers_vae("every_block"), tmp_path / "vae")
    rewrite_weights(folder, lambda state: [state.pop(k) for k in list(state)
                                           if k.startswith("decoder.up_blocks.1.resnets.2.")])
    with pytest.raises(RuntimeError, match=r"missing keys: decoder\.up\.1\.2\.conv1\.bias"):
        load_autoencoder_kl(folder, image_size=32)


def test_parity_sees_a_transposed_or_swapped_attention_weight(tmp_path, one_thread):
    """A transposed square projection or q and k exchanged keep every shape, so only the
    outputs can tell; the random weights make them tell."""
    theirs = diffusers_vae("every_block")
    x = images()
    with torch.no_grad():
        z = theirs.encode(x).latent_dist.mean
        reference = theirs.decode(z).sample
    for i, edit in enumerate((
            lambda s: s.update({"decoder.mid_block.attentions.0.to_q.weight":
                                s["decoder.mid_block.attentions.0.to_q.weight"].T}),
            lambda s: s.update({"decoder.mid_block.attentions.0.to_q.weight": s["decoder.mid_block.attentions.0.to_k.weight"],
                                "decoder.mid_block.attentions.0.to_k.weight": s["decoder.mid_block.attentions.0.to_q.weight"]}),
            lambda s: s.update({"decoder.up_blocks.0.attentions.1.to_out.0.weight":
                                s["decoder.up_blocks.0.attentions.1.to_out.0.weight"].T}))):
        folder = saved(theirs, tmp_path / f"v{i}")
        rewrite_weights(folder, edit)
        with torch.no_grad():
            error = (load_autoencoder_kl(folder, image_size=32).decode(z) - reference).abs().max().item()
        assert error > 100 * TOL["atol"], (i, error)


def test_loader_errors_are_one_line_naming_the_problem(tmp_path):
    folder = saved(diffusers_vae("every_block"), tmp_path / "vae")
    config_path = os.path.join(folder, "config.json")
    with open(config_path) as f:
        config = json.load(f)

    def write(**changes):
        with open(config_path, "w") as f:
            json.dump(dict(config, **changes), f)

    write(some_new_field=1)
    with pytest.raises(ValueError, match=r"unknown config.json field\(s\) \['some_new_field'\]"):
        load_autoencoder_kl(folder)
    write(down_block_types=["AttnDownEncoderBlock2D", "DownEncoderBlock2D"])
    with pytest.raises(ValueError, match="attention in a level is supported only at the lowest"):
        load_autoencoder_kl(folder)
    write(latent_channels=8)
    with pytest.raises(RuntimeError, match=r"mis-shaped keys: .*encoder\.conv_out\.weight"):
        load_autoencoder_kl(folder)
    write()
    os.remove(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    with pytest.raises(FileNotFoundError, match="no diffusion_pytorch_model.safetensors"):
        load_tokenizer_or_vae(folder)
    os.remove(config_path)       # no longer a diffusers folder: read as a checkpoint file
    with pytest.raises(FileNotFoundError, match="tokenizer checkpoint not found"):
        load_tokenizer_or_vae(folder)


#################################################################################
#                    A diffusers folder through the DiT commands                #
#################################################################################

def test_a_diffusers_folder_trains_and_samples_a_patch_2_dit(tmp_path, one_thread):
    """train_diffusion.py --tokenizer FOLDER --model LightningDiT-B/2 on 256 px images: the
    cache holds diffusers' posterior means of the images and their flips, the DiT sees f8's
    32x32 latents as 16x16 tokens; sample.py decodes the checkpoint's samples with the folder."""
    import numpy as np
    from PIL import Image
    import sample
    from data import build_dataset
    from dit import load_dit
    from train_diffusion import main, parse_args
    theirs = diffusers_vae("sd")
    folder = saved(theirs, tmp_path / "sd")
    out = tmp_path / "dit"
    main(parse_args(["--tokenizer", folder, "--out", str(out), "--model", "LightningDiT-B/2", "--num-images", "4",
                     "--batch-size", "4", "--depth", "1", "--hidden-size", "32", "--num-heads", "2", "--steps", "2",
                     "--log-every", "1", "--sample-columns", "1", "--sample-steps", "1", "--cache-dtype", "float32"]))
    model, checkpoint = load_dit(str(out / "checkpoint.pt"), use_ema=True)
    assert (model.config["patch_size"], model.config["input_size"], model.config["in_channels"]) == (2, 32, 4)
    cache = np.load(str(next((out / "latents").glob("latents-*.npy"))))
    x = torch.stack([build_dataset("synthetic", 256, "train", 4, 0)[i][0] for i in range(2)])
    with torch.no_grad():
        expected = theirs.encode(torch.cat((x, x.flip(-1)))).latent_dist.mode()
    torch.testing.assert_close(torch.from_numpy(cache[:2, 0]), expected[:2], **TOL)
    torch.testing.assert_close(torch.from_numpy(cache[:2, 1]), expected[2:], **TOL)
    grid = str(tmp_path / "grid.png")
    sample.main(["--ckpt", str(out / "checkpoint.pt"), "--grid", grid, "--classes", "0", "--per-class", "1",
                 "--steps", "1", "--device", "cpu"])
    assert Image.open(grid).size[1] >= 256
