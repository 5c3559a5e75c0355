"""
Losses for training the AlignTok tokenizer.

    L_rec = L1(x, x_hat) + 1.0 * LPIPS(x, x_hat) + 0.5 * lambda_adapt * generator_loss(D(x_hat))
    L_sp  = semantic_preservation_loss(z, z_frozen)        (stage 2 only)
    L_kl  = kl_loss(mean, logvar)                          (the VAE baselines, vae.py)

The L1 term is F.l1_loss in the caller. The file reads top to bottom: LPIPS (VGG16
trunk + the v0.1 linear heads, loaded from two local files), the PatchGAN
discriminator with its hinge losses, LDM's adaptive GAN weight, the semantic
preservation loss and the VAE baselines' KL term.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from layers import constructor_config
from weights import load_state_dict_strict, named_weights_file


#################################################################################
#                              LPIPS (VGG16, v0.1)                              #
#################################################################################

VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
LPIPS_VGG_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth"

# VGG16 "D" configuration: output channels of each 3x3 conv, "M" for a 2x2 max-pool.
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# Indices in `features` of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (torchvision layout).
VGG16_TAPS = (3, 8, 15, 22, 29)
LPIPS_CHANNELS = (64, 128, 256, 512, 512)


class VGG16Features(nn.Module):
    """torchvision's vgg16().features up to relu5_3, same module indices, so the keys
    `features.N.weight/bias` of torchvision's state dict load as they are."""
    def __init__(self):
        super().__init__()
        layers, in_ch = [], 3
        for v in VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(in_ch, v, 3, padding=1), nn.ReLU()]
                in_ch = v
        self.features = nn.Sequential(*layers)

    def forward(self, x):
        taps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in VGG16_TAPS:
                taps.append(x)
        return taps                                             # 5 x (N, C_l, H_l, W_l)


class LinearHead(nn.Module):
    """One lpips v0.1 "lin" layer: a 1x1 conv to one channel, no bias. The conv sits at
    index 1 of `model` (key `model.1.weight`) as in the lpips files; index 0 held a
    dropout used only when lpips trained the heads, so it is an Identity here."""
    def __init__(self, channels):
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x):
        return self.model(x)


def normalize_channels(x, eps=1e-10):
    return x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class LPIPS(nn.Module):
    """LPIPS distance with a VGG16 trunk and the v0.1 linear heads.

    Images in [-1, 1], shape (N, 3, H, W). Returns the distance per image, shape (N,)
    (the lpips package returns (N, 1, 1, 1); take .mean() for a loss). Frozen and in
    eval mode; nothing in it depends on train/eval mode, so a parent's .train() is
    harmless. Gradients flow to the inputs.
    """
    def __init__(self):
        super().__init__()
        # lpips' ScalingLayer: maps [-1, 1] images to the ImageNet normalisation VGG expects.
        shift, scale = torch.tensor([-0.030, -0.088, -0.188]), torch.tensor([0.458, 0.448, 0.450])
        self.register_buffer("shift", shift.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", scale.view(1, 3, 1, 1), persistent=False)
        self.vgg = VGG16Features()
        self.heads = nn.ModuleDict({f"lin{i}": LinearHead(c) for i, c in enumerate(LPIPS_CHANNELS)})

    def forward(self, x, y):
        feats_x = self.vgg((x - self.shift) / self.scale)
        feats_y = self.vgg((y - self.shift) / self.scale)
        dist = 0
        for head, fx, fy in zip(self.heads.values(), feats_x, feats_y):
            diff = (normalize_channels(fx) - normalize_channels(fy)).pow(2)  # (N, C_l, H_l, W_l)
            dist = dist + head(diff).mean(dim=(1, 2, 3))                     # (N,)
        return dist


def load_lpips(vgg_weights, lpips_weights):
    """Builds the frozen LPIPS from two local files: torchvision's VGG16 ImageNet state
    dict (vgg16-397923af.pth; only its features.* keys are used, the classifier is
    dropped) and the lpips v0.1 VGG head file (lpips/weights/v0.1/vgg.pth in the lpips
    package, keys lin0.model.1.weight ... lin4.model.1.weight). Loading is strict."""
    vgg_state = named_weights_file(vgg_weights, "--vgg-weights",
                                   "torchvision's VGG16 ImageNet state dict", VGG16_URL)
    head_state = named_weights_file(lpips_weights, "--lpips-weights",
                                    "the lpips v0.1 VGG linear heads", LPIPS_VGG_URL)
    model = LPIPS()
    vgg_state = {k: v for k, v in vgg_state.items() if not k.startswith("classifier.")}
    load_state_dict_strict(model.vgg, vgg_state, vgg_weights)
    load_state_dict_strict(model.heads, head_state, lpips_weights)
    model.requires_grad_(False)
    return model.eval()


#################################################################################
#                        PatchGAN discriminator + hinge loss                    #
#################################################################################

def _norm_layer(norm, channels):
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        return nn.GroupNorm(math.gcd(32, channels), channels)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"unknown discriminator norm {norm!r}; choose 'batch', 'group' or 'none'")


class PatchDiscriminator(nn.Module):
    """pix2pix / LDM NLayerDiscriminator: 4x4 convs, stride 2 then 1, LeakyReLU 0.2.
    Outputs one logit per overlapping patch, (N, 1, H/8 - 2, W/8 - 2) for n_layers=3.

    norm: "group" (the default, our choice, as train_tokenizer.py's --disc-norm: GroupNorm,
    32 groups where the width allows; no batch statistics, so real and fake batches or DDP
    ranks do not interact), "batch" (LDM's) or "none".
    Convs followed by a norm carry no bias, as in LDM.
    """
    def __init__(self, in_channels=3, width=64, n_layers=3, norm="group"):
        self.config = constructor_config(locals())
        super().__init__()
        bias = norm == "none"
        layers = [nn.Conv2d(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = width
        for n in range(1, n_layers + 1):
            out_ch = width * min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ch, out_ch, 4, stride, 1, bias=bias),
                       _norm_layer(norm, out_ch), nn.LeakyReLU(0.2)]
            ch = out_ch
        layers.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        self.initialize_weights()

    def initialize_weights(self):
        # LDM's weights_init: conv weights N(0, 0.02) (biases keep PyTorch's default), norm scale N(1, 0.02).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.main(x)                                     # (N, 1, h, w) logits


def patch_grid_size(image_size, n_layers):
    """Side of PatchDiscriminator's logit map on image_size images: the stride-2 4x4 convs
    halve the size, the two stride-1 4x4 convs (padding 1) each take one pixel off. Below 1
    the network cannot run on such images."""
    size = image_size
    for _ in range(n_layers):           # the first conv and the n_layers - 1 strided ones
        size //= 2
    return size - 2


def hinge_d_loss(logits_real, logits_fake):
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_loss(logits_fake):
    return -logits_fake.mean()


#################################################################################
#                        Adaptive GAN weight (LDM)                              #
#################################################################################

def adaptive_weight(rec_loss, gan_loss, last_layer, max_weight=1e4):
    """lambda_adapt = ||d rec_loss / d W|| / (||d gan_loss / d W|| + 1e-4), clamped to
    [0, max_weight] and detached, W the decoder's last conv weight. It balances the GAN
    gradient against the reconstruction gradient at the decoder output. The generator's
    GAN term is then 0.5 * lambda_adapt * gan_loss (LDM's disc_weight; docs/method.md). Graphs are retained so that
    the caller can still backpropagate the total loss."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (gan_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


#################################################################################
#                       Semantic preservation loss (stage 2)                    #
#################################################################################

def semantic_preservation_loss(z, z_ref, kind="l2"):
    """L_sp between the trainable encoder+adapter's latent z and the frozen stage-1
    copy's z_ref, both (N, C, h, w). z_ref is detached here: no gradient reaches the
    frozen copy. kind "l2": mean squared error (the paper's default); "cosine": mean over
    tokens (h*w positions) of 1 - cosine similarity over the C channels."""
    if z.shape != z_ref.shape or z.ndim != 4:
        raise ValueError(f"semantic_preservation_loss wants two (N, C, h, w) latents of the same "
                         f"shape, got {tuple(z.shape)} and {tuple(z_ref.shape)}")
    z_ref = z_ref.detach()
    if kind == "l2":
        return F.mse_loss(z, z_ref)
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(z, z_ref, dim=1)).mean()   # cos: (N, h, w)
    raise ValueError(f"unknown semantic preservation loss {kind!r}; choose 'l2' or 'cosine'")


#################################################################################
#                          KL term of the VAE baselines                         #
#################################################################################

def kl_loss(mean, logvar):
    """KL(N(mean, exp(logvar)) || N(0, I)) of a diagonal Gaussian posterior, both (N, C, h, w):
    0.5 * sum over C, h, w of (mean^2 + exp(logvar) - 1 - logvar) per image, averaged over
    the batch (LDM's KL term; the Vanilla VAE and VA-VAE weight it by 1e-6)."""
    per_image = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2, 3))   # (N,)
    return per_image.mean()
