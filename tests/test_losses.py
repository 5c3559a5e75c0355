"""Tests for losses.py: LPIPS parity with the lpips package, strict loading, the
PatchGAN discriminator and hinge loss, the adaptive GAN weight and L_sp. CPU, fast."""
import re
import warnings

import pytest
import torch
import torch.nn as nn

import losses


#################################################################################
#                                    LPIPS                                      #
#################################################################################

@pytest.fixture(scope="module")
def reference_lpips():
    import lpips
    torch.manual_seed(0)
    warnings.filterwarnings("ignore", message=".*(pretrained|weight enum).*", category=UserWarning)
    # pnet_rand=True: random VGG trunk (torchvision pretrained=False, no download); the
    # linear heads come from the file shipped inside the lpips package.
    return lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()


@pytest.fixture(scope="module")
def weight_files(reference_lpips, tmp_path_factory):
    """The reference's weights written as torchvision's VGG16 file and lpips' head file."""
    root = tmp_path_factory.mktemp("lpips_weights")
    vgg = {}
    for key, value in reference_lpips.net.state_dict().items():   # "slice3.12.weight"
        vgg["features." + key.split(".", 1)[1]] = value.clone()
    # torchvision's file also holds the classifier; it must be ignored.
    vgg["classifier.0.weight"] = torch.randn(8, 4)
    vgg["classifier.0.bias"] = torch.randn(8)
    heads = {k: v.clone() for k, v in reference_lpips.state_dict().items()
             if re.fullmatch(r"lin\d\.model\.1\.weight", k)}
    assert len(vgg) == 2 * 13 + 2 and len(heads) == 5
    vgg_path, head_path = str(root / "vgg16.pth"), str(root / "vgg_heads.pth")
    torch.save(vgg, vgg_path)
    torch.save(heads, head_path)
    return vgg_path, head_path, vgg, heads


def test_lpips_matches_reference(reference_lpips, weight_files):
    vgg_path, head_path, _, _ = weight_files
    ours = losses.load_lpips(vgg_path, head_path)
    torch.manual_seed(1)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    y = torch.rand(2, 3, 64, 64) * 2 - 1
    y2 = (x + 0.1 * torch.randn_like(x)).clamp(-1, 1)
    with torch.no_grad():
        d_far, d_near = ours(x, y), ours(x, y2)
        assert d_far.shape == (2,)
        torch.testing.assert_close(d_far, reference_lpips(x, y).flatten(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(d_near, reference_lpips(x, y2).flatten(), rtol=1e-5, atol=1e-6)
        d_same = ours(x[:1], x[:1])
    # Not a constant: it moves with the images, is 0 for identical ones.
    assert (d_far - d_near).abs().min() > 1e-3 and (d_far > 0).all()
    assert d_same.abs().max() < 1e-6


def test_lpips_frozen_eval_and_differentiable(weight_files):
    vgg_path, head_path, _, _ = weight_files
    ours = losses.load_lpips(vgg_path, head_path)
    assert not ours.training
    assert all(not p.requires_grad for p in ours.parameters())
    # The frozen buffers are not part of the state dict; the loaded weights are.
    assert not any(k in ("shift", "scale") for k in ours.state_dict())
    x = (torch.rand(1, 3, 32, 32) * 2 - 1).requires_grad_()
    ours(x, torch.zeros(1, 3, 32, 32)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_lpips_strict_head_loading(weight_files, tmp_path):
    vgg_path, _, _, heads = weight_files
    partial = {k: v for k, v in heads.items() if k != "lin3.model.1.weight"}
    bad_path = str(tmp_path / "heads_missing.pth")
    torch.save(partial, bad_path)
    with pytest.raises(RuntimeError, match=r"heads_missing\.pth.*lin3\.model\.1\.weight"):
        losses.load_lpips(vgg_path, bad_path)


def test_lpips_strict_vgg_loading(weight_files, tmp_path):
    _, head_path, vgg, _ = weight_files
    broken = {k: v for k, v in vgg.items() if k != "features.14.bias"}
    broken["features.14.weight"] = torch.zeros(256, 128, 3, 3)   # wrong shape
    bad_path = str(tmp_path / "vgg_broken.pth")
    torch.save(broken, bad_path)
    with pytest.raises(RuntimeError, match=r"vgg_broken\.pth") as err:
        losses.load_lpips(bad_path, head_path)
    assert "features.14.bias" in str(err.value) and "features.14.weight" in str(err.value)
    # Swapped files: the head file is no VGG state dict.
    with pytest.raises(RuntimeError, match=r"lin0\.model\.1\.weight"):
        losses.load_lpips(head_path, head_path)


def test_lpips_missing_file_names_flag(weight_files, tmp_path):
    vgg_path, head_path, _, _ = weight_files
    with pytest.raises(FileNotFoundError, match=r"--vgg-weights.*vgg16-397923af\.pth"):
        losses.load_lpips(str(tmp_path / "nope.pth"), head_path)
    with pytest.raises(FileNotFoundError, match=r"--lpips-weights.*v0\.1/vgg\.pth"):
        losses.load_lpips(vgg_path, None)


#################################################################################
#                       PatchGAN discriminator + hinge loss                     #
#################################################################################

def test_hinge_and_generator_loss_hand_values():
    real = torch.tensor([2.0, 0.5, -1.0])        # relu(1 - real) = 0, 0.5, 2   -> mean 5/6
    fake = torch.tensor([-2.0, 0.0, 1.0])        # relu(1 + fake) = 0, 1, 2     -> mean 1
    assert losses.hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 1))
    assert losses.generator_loss(fake).item() == pytest.approx(1 / 3)


@pytest.mark.parametrize("norm", ["batch", "group", "none"])
def test_discriminator_shapes(norm):
    torch.manual_seed(0)
    disc = losses.PatchDiscriminator(norm=norm)
    assert disc(torch.randn(2, 3, 32, 32)).shape == (2, 1, 2, 2)
    with torch.no_grad():
        assert disc(torch.randn(1, 3, 256, 256)).shape == (1, 1, 30, 30)


def test_discriminator_layout_and_init():
    torch.manual_seed(0)
    assert losses.PatchDiscriminator().config["norm"] == "group"    # the default of --disc-norm
    disc = losses.PatchDiscriminator(norm="batch")
    # LDM's NLayerDiscriminator (ndf=64, n_layers=3, BatchNorm), counted by hand:
    # conv 3->64 (+bias), convs 64->128, 128->256, 256->512 without bias + BN, conv 512->1 (+bias).
    expected = (3 * 64 * 16 + 64) + (64 * 128 * 16 + 2 * 128) + (128 * 256 * 16 + 2 * 256) \
        + (256 * 512 * 16 + 2 * 512) + (512 * 16 + 1)
    assert sum(p.numel() for p in disc.parameters()) == expected
    big_conv = [m for m in disc.modules() if isinstance(m, nn.Conv2d)][3]
    assert big_conv.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert abs(big_conv.weight.mean().item()) < 1e-3
    bn = [m for m in disc.modules() if isinstance(m, nn.BatchNorm2d)][-1]
    assert bn.weight.mean().item() == pytest.approx(1.0, abs=0.005)
    assert bn.weight.std().item() == pytest.approx(0.02, rel=0.2)
    assert bn.bias.abs().max() == 0
    with pytest.raises(ValueError, match="norm"):
        losses.PatchDiscriminator(norm="layer")


#################################################################################
#                             Adaptive GAN weight                               #
#################################################################################

def test_adaptive_weight_matches_hand_gradients():
    torch.manual_seed(0)
    B, k, m = 4, 5, 6
    hidden = torch.randn(B, k)                            # output of the decoder before its last layer
    last = nn.Linear(k, m, bias=False)                    # the "last conv": x_hat = hidden @ W^T
    x = torch.randn(B, m)
    v = torch.randn(m)                                    # a linear "discriminator": logits = x_hat @ v
    x_hat = last(hidden)
    rec = (x_hat - x).abs().mean()
    gan = -(x_hat @ v).mean()

    # d rec / dW = sign(x_hat - x)^T hidden / (B m);  d gan / dW = -v (sum_b hidden_b)^T / B
    with torch.no_grad():
        g_rec = torch.sign(x_hat - x).T @ hidden / (B * m)
        g_gan = -torch.outer(v, hidden.sum(0)) / B
        expected = g_rec.norm() / (g_gan.norm() + 1e-4)

    weight = losses.adaptive_weight(rec, gan, last.weight)
    assert not weight.requires_grad
    torch.testing.assert_close(weight, expected, rtol=1e-5, atol=0)
    # Graphs were retained: the total loss still backpropagates.
    (rec + 0.5 * weight * gan).backward()
    assert last.weight.grad is not None

    # Clamped at max_weight when the reconstruction gradient dwarfs the GAN gradient
    # (ratio about 5e6 here; the +1e-4 alone caps it near 5e3 for a vanishing GAN gradient).
    x_hat = last(hidden)
    big_rec = (x_hat - x).abs().mean() * 1e3
    tiny_gan = -(x_hat @ v).mean() * 1e-6
    assert losses.adaptive_weight(big_rec, tiny_gan, last.weight).item() == 1e4
    assert losses.adaptive_weight(big_rec, tiny_gan, last.weight, max_weight=3.0).item() == 3.0


#################################################################################
#                          Semantic preservation loss                           #
#################################################################################

@pytest.mark.parametrize("kind", ["l2", "cosine"])
def test_semantic_preservation_zero_positive_and_no_grad_to_ref(kind):
    torch.manual_seed(0)
    z_ref = torch.randn(2, 8, 4, 4, requires_grad=True)
    z = z_ref.detach().clone().requires_grad_()
    assert losses.semantic_preservation_loss(z, z_ref, kind).item() == pytest.approx(0.0, abs=1e-6)
    z_moved = (z + torch.randn_like(z))
    loss = losses.semantic_preservation_loss(z_moved, z_ref, kind)
    assert loss.item() > 1e-2
    loss.backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert z_ref.grad is None


def test_semantic_preservation_hand_values():
    z = torch.zeros(1, 2, 1, 2)
    z[0, 0, 0, 0] = 1.0                                   # token 0: (1, 0)
    z[0, 1, 0, 1] = 1.0                                   # token 1: (0, 1)
    z_ref = torch.zeros(1, 2, 1, 2)
    z_ref[0, 0, 0, :] = 2.0                               # both tokens: (2, 0)
    # l2: squared errors (1, 4, 0, 1) over 4 entries; cosine: token 0 aligned (0), token 1 orthogonal (1).
    assert losses.semantic_preservation_loss(z, z_ref, "l2").item() == pytest.approx(6 / 4)
    assert losses.semantic_preservation_loss(z, z_ref, "cosine").item() == pytest.approx(0.5)
    # cosine ignores scale, l2 does not.
    scaled = losses.semantic_preservation_loss(3 * z_ref, z_ref, "cosine")
    assert scaled.item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="cosine"):
        losses.semantic_preservation_loss(z, z_ref, "l1")
    with pytest.raises(ValueError, match="shape"):
        losses.semantic_preservation_loss(z.flatten(2), z_ref.flatten(2))
