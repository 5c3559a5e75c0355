"""
The LDM/diffusers AutoencoderKL: a convolutional encoder to the moments of a diagonal
Gaussian posterior, and the decoder AlignTok shares; the Vanilla VAE baseline and the
model behind pretrained diffusers VAE folders (SD-VAE, SDXL, FLUX.1).

    image [-1, 1] --encoder--> moments (N, 2C, h, w) --quant_conv--> mean, logvar
    z = mean (encode) or mean + std * eps (training)
    z --post_quant_conv--> decoder --> image [-1, 1]

The decoder, its residual blocks, attention and upsampling are tokenizer.py's: they are
structurally LDM's and diffusers' (the same GroupNorm + SiLU pre-activation residual block,
single-head attention over the pixels, nearest upsampling + 3x3 conv, the same order), so a
diffusers file loads into them by renaming keys and fusing q, k, v. The one difference is
where attention sits: LDM's kl-f16 / VA-VAE f16d32 put it after every residual block of the
lowest level too (our decoder's default), SD's and FLUX's VAEs only in the middle block
(level_attention=False).

The file reads top to bottom: the encoder, the posterior, the AutoencoderKL module with the
methods every command uses on a tokenizer, then reading a diffusers folder, and
load_tokenizer_or_vae, which every command's --tokenizer goes through.

    SD-VAE f8c4:     width 128, multipliers (1, 2, 4, 4), 2 residual blocks, latent 4, level_attention=False
    FLUX.1 f8c16:    the same with latent 16, no quant_conv / post_quant_conv
    Vanilla VAE f16d32 (LDM kl-f16, VA-VAE's): width 128, multipliers (1, 1, 2, 2, 4), latent 32
"""
import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from layers import constructor_config
from losses import kl_loss
from tokenizer import AlignTok, AttentionBlock, Decoder, ResnetBlock, Upsample, group_norm, load_tokenizer
from weights import load_state_dict_strict, read_safetensors, read_weights


#################################################################################
#                                    Encoder                                    #
#################################################################################

class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding one pixel on the right and bottom only (LDM's and
    diffusers' asymmetric padding: the output pixel i sees input pixels 2i .. 2i + 2)."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))                  # (N, C, H/2, W/2)


class Encoder(nn.Module):
    """The LDM / diffusers convolutional encoder, the decoder's mirror: res_blocks residual
    blocks per level (the decoder has one more), a downsampling after every level but the
    last, the Res-Attn-Res middle block, GroupNorm + SiLU + conv to the 2C moments, then
    quant_conv (a 1x1 conv on the moments; an Identity when the VAE has none, as FLUX's).
    quant_conv sits here, not in AutoencoderKL, so that everything encode() depends on is
    under "encoder." (the latent cache hashes those weights)."""

    def __init__(self, latent_channels=32, width=128, multipliers=(1, 1, 2, 2, 4), res_blocks=2,
                 level_attention=True, quant_conv=True):
        super().__init__()
        channels = width * multipliers[0]
        self.conv_in = nn.Conv2d(3, channels, 3, padding=1)
        levels = []
        for level, multiplier in enumerate(multipliers):
            out_channels = width * multiplier
            layers = []
            for _ in range(res_blocks):
                layers.append(ResnetBlock(channels, out_channels))
                channels = out_channels
                if level_attention and level == len(multipliers) - 1:   # attention only at the latent resolution
                    layers.append(AttentionBlock(channels))
            if level != len(multipliers) - 1:
                layers.append(Downsample(channels))
            levels.append(nn.Sequential(*layers))
        self.down = nn.Sequential(*levels)
        self.mid = nn.Sequential(ResnetBlock(channels, channels), AttentionBlock(channels),
                                 ResnetBlock(channels, channels))
        self.norm_out = group_norm(channels)
        self.conv_out = nn.Conv2d(channels, 2 * latent_channels, 3, padding=1)
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1) if quant_conv else nn.Identity()
        self.initialize_weights()

    def initialize_weights(self):
        # As the decoder: PyTorch's default init for convolutions and the attention's linear
        # layers (LDM's), GroupNorm as the identity.
        for module in self.modules():
            if isinstance(module, nn.GroupNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @property
    def last_layer(self):
        """The encoder's last conv weight (before quant_conv), where VA-VAE takes the
        gradients of its adaptive VF weight."""
        return self.conv_out.weight

    def forward(self, x):
        x = self.conv_in(x)                                         # (N, W*m[0], H, W)
        x = self.down(x)                                            # (N, W*m[-1], h, w)
        x = self.mid(x)
        x = self.conv_out(F.silu(self.norm_out(x)))                 # (N, 2C, h, w)
        return self.quant_conv(x)                                   # (N, 2C, h, w)


#################################################################################
#                                   Posterior                                   #
#################################################################################

class DiagonalGaussian:
    """LDM's posterior q(z | x) = N(mean, diag(exp(logvar))) from the moments (N, 2C, h, w):
    the first C channels are the mean, the last C the log-variance, clamped to [-30, 20]
    as LDM and diffusers do (exp stays finite in float16/32)."""

    def __init__(self, moments):
        self.mean, logvar = moments.chunk(2, dim=1)                 # each (N, C, h, w)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator=None):
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise                         # (N, C, h, w)

    def kl(self):
        """KL(q || N(0, I)), summed over C, h, w and averaged over the batch (losses.kl_loss)."""
        return kl_loss(self.mean, self.logvar)


#################################################################################
#                                  AutoencoderKL                                #
#################################################################################

class AutoencoderKL(nn.Module):
    """Encoder + diagonal Gaussian posterior + decoder, with the methods and attributes the
    commands use on an AlignTok (encode, decode, normalize, denormalize, latent_mean,
    latent_std, image_size, grid_size, config), so a VAE goes wherever a tokenizer does.

    encode: image [-1, 1] (N, 3, H, W) -> the posterior mean (N, C, h, w). The DiT, the
            latent cache and the latent statistics use the mean, not a sample: it is the
            deterministic latent the decoder was trained to invert on average, and the
            cached latents then do not depend on a random draw (LightningDiT caches the
            mean for VA-VAE as well).
    decode: z -> post_quant_conv -> decoder -> image [-1, 1] (N, 3, H, W)

    latent_mean / latent_std are the per-channel statistics the DiT normalises with, as
    for AlignTok. diffusers' scaling_factor s and shift_factor b mean z_dit = (z - b) * s,
    i.e. a mean of b and a std of 1/s shared by all channels; a diffusers folder loads with
    those (load_autoencoder_kl), and per-channel statistics computed on the data as for our
    tokenizers replace them.
    """

    def __init__(self, latent_channels=32, width=128, multipliers=(1, 1, 2, 2, 4), res_blocks=2,
                 level_attention=True, quant_conv=True, post_quant_conv=True, image_size=256):
        config = constructor_config(locals())
        super().__init__()
        self.config = config
        downsampling = 2 ** (len(multipliers) - 1)
        if image_size % downsampling:
            raise ValueError(f"image_size {image_size} is not a multiple of the VAE's downsampling {downsampling}")
        self.image_size = image_size
        self.grid_size = (image_size // downsampling,) * 2
        self.encoder = Encoder(latent_channels, width, multipliers, res_blocks, level_attention, quant_conv)
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1) if post_quant_conv else nn.Identity()
        self.decoder = Decoder(latent_channels, width, multipliers, res_blocks, level_attention)
        self.register_buffer("latent_mean", torch.zeros(latent_channels))
        self.register_buffer("latent_std", torch.ones(latent_channels))

    def posterior(self, images):
        return DiagonalGaussian(self.encoder(images))

    def encode(self, images):
        return self.posterior(images).mean                          # (N, C, h, w)

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))                # (N, 3, H, W)

    def forward(self, images, generator=None):
        """Returns the reconstruction of a posterior sample, the sample and the posterior
        (whose kl() is the KL term)."""
        posterior = self.posterior(images)
        z = posterior.sample(generator)                             # (N, C, h, w)
        return self.decode(z), z, posterior

    # The one standardisation of the project, AlignTok's.
    normalize = AlignTok.normalize
    denormalize = AlignTok.denormalize


#################################################################################
#                          Reading a diffusers folder                           #
#################################################################################

# Every field diffusers' AutoencoderKL config may hold (diffusers 0.2x-0.4x), and what we
# accept of the ones our model does not build differently.
DIFFUSERS_FIELDS = {"in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
                    "layers_per_block", "act_fn", "latent_channels", "norm_num_groups", "sample_size",
                    "scaling_factor", "shift_factor", "latents_mean", "latents_std", "force_upcast",
                    "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"}
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def config_from_diffusers(diffusers_config, source, image_size=256):
    """Our AutoencoderKL arguments from a diffusers config.json dict; any field or value we
    do not build is a ValueError of one line."""
    def refuse(problem):
        return ValueError(f"{source}: {problem}; only diffusers AutoencoderKL folders of the LDM layout "
                          f"(SD-VAE, SDXL, FLUX.1) load")
    cfg = {k: v for k, v in diffusers_config.items() if not k.startswith("_")}
    if diffusers_config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise refuse(f"config.json describes a {diffusers_config['_class_name']}, not an AutoencoderKL")
    unknown = sorted(set(cfg) - DIFFUSERS_FIELDS)
    if unknown:
        raise refuse(f"unknown config.json field(s) {unknown}")
    channels = list(cfg.get("block_out_channels", (64,)))
    levels = len(channels)
    down = list(cfg.get("down_block_types", ("DownEncoderBlock2D",)))
    up = list(cfg.get("up_block_types", ("UpDecoderBlock2D",)))
    if len(down) != levels or len(up) != levels:
        raise refuse(f"{len(down)} down and {len(up)} up block types for {levels} block_out_channels")
    # Attention in a level is only built at the lowest resolution, in both paths or neither.
    plain_down, plain_up = ["DownEncoderBlock2D"] * levels, ["UpDecoderBlock2D"] * levels
    attn_down = plain_down[:-1] + ["AttnDownEncoderBlock2D"]
    attn_up = ["AttnUpDecoderBlock2D"] + plain_up[1:]
    if (down, up) not in ((plain_down, plain_up), (attn_down, attn_up)):
        raise refuse(f"block types {down} / {up} (attention in a level is supported only at the lowest "
                     f"resolution of both paths)")
    width = channels[0]
    if any(c % width for c in channels):
        raise refuse(f"block_out_channels {channels} are not multiples of the first")
    for field, expected in (("in_channels", 3), ("out_channels", 3), ("act_fn", "silu"), ("norm_num_groups", 32),
                            ("mid_block_add_attention", True)):
        if cfg.get(field, expected) != expected:
            raise refuse(f"{field} = {cfg[field]!r} (our blocks build {expected!r})")
    if min(channels) < 32:
        raise refuse(f"block_out_channels {channels} below 32 (GroupNorm has 32 groups)")
    return dict(latent_channels=cfg.get("latent_channels", 4), width=width,
                multipliers=tuple(c // width for c in channels), res_blocks=cfg.get("layers_per_block", 1),
                level_attention=down == attn_down, quant_conv=cfg.get("use_quant_conv", True),
                post_quant_conv=cfg.get("use_post_quant_conv", True), image_size=image_size)


def diffusers_module_names(model):
    """Our module name -> (diffusers' module name, kind) for every module with weights."""
    names = {"encoder.conv_in": ("encoder.conv_in", "plain"), "encoder.norm_out": ("encoder.conv_norm_out", "plain"),
             "encoder.conv_out": ("encoder.conv_out", "plain"), "encoder.quant_conv": ("quant_conv", "plain"),
             "post_quant_conv": ("post_quant_conv", "plain"), "decoder.conv_in": ("decoder.conv_in", "plain"),
             "decoder.norm_out": ("decoder.conv_norm_out", "plain"), "decoder.conv_out": ("decoder.conv_out", "plain")}
    for side in ("encoder", "decoder"):
        for ours, theirs in (("mid.0", "mid_block.resnets.0"), ("mid.1", "mid_block.attentions.0"),
                             ("mid.2", "mid_block.resnets.1")):
            names[f"{side}.{ours}"] = (f"{side}.{theirs}", "attention" if "attentions" in theirs else "resnet")
        path, blocks = ("down", "down_blocks") if side == "encoder" else ("up", "up_blocks")
        for i, level in enumerate(getattr(model, side).get_submodule(path)):
            counts = {}
            for j, module in enumerate(level):
                group, kind = ((("resnets", "resnet") if isinstance(module, ResnetBlock) else
                                ("attentions", "attention") if isinstance(module, AttentionBlock) else
                                ("upsamplers", "plain") if isinstance(module, Upsample) else ("downsamplers", "plain")))
                names[f"{side}.{path}.{i}.{j}"] = (f"{side}.{blocks}.{i}.{group}.{counts.get(group, 0)}", kind)
                counts[group] = counts.get(group, 0) + 1
    return names


# Attention parameter names, diffusers' current and pre-0.15 ones: q, k, v fuse into qkv.
QKV_PARTS = {"to_q": 0, "query": 0, "to_k": 1, "key": 1, "to_v": 2, "value": 2}
ATTENTION_RENAMES = {"group_norm": "norm", "to_out.0": "attn.proj", "proj_attn": "attn.proj"}


def convert_diffusers_vae(state, model):
    """A diffusers AutoencoderKL state dict in our key layout. A key we do not know stays as
    it is (and a part we need is then missing), so strict loading names it."""
    prefixes = {theirs: (ours, kind) for ours, (theirs, kind) in diffusers_module_names(model).items()}
    out, qkv = {}, {}
    for key, value in state.items():
        parts = key.split(".")
        found = next(((".".join(parts[:n]), ".".join(parts[n:])) for n in range(len(parts) - 1, 0, -1)
                      if ".".join(parts[:n]) in prefixes), None)
        if found is None:
            out[key] = value
            continue
        (ours, kind), leaf = prefixes[found[0]], found[1]
        if kind == "resnet" and leaf.startswith("conv_shortcut."):
            leaf = "shortcut." + leaf.removeprefix("conv_shortcut.")
        elif kind == "attention":
            if leaf.endswith(".weight") and value.ndim == 4:         # LDM's 1x1 convs: (C, C, 1, 1) -> (C, C)
                value = value.flatten(1)
            name, parameter = leaf.rsplit(".", 1)
            if name in QKV_PARTS:
                qkv.setdefault(f"{ours}.attn.qkv.{parameter}", [None] * 3)[QKV_PARTS[name]] = value
                continue
            leaf = f"{ATTENTION_RENAMES.get(name, name)}.{parameter}"
        out[f"{ours}.{leaf}"] = value
    for key, parts in qkv.items():
        if any(p is None for p in parts):
            continue        # left missing: strict loading names the key
        out[key] = torch.cat(parts, dim=0)
    return out


def load_autoencoder_kl(folder, image_size=256):
    """Our AutoencoderKL from a diffusers folder (config.json and
    diffusion_pytorch_model.safetensors or .bin), loaded strictly, without diffusers.
    latent_mean / latent_std are set from the folder's scaling_factor s, shift_factor b
    and, where given, latents_mean / latents_std (diffusers' z_dit = (z - mean) * s / std):
    mean b or latents_mean, std 1 / s or latents_std / s. image_size is the size the
    commands give the VAE its images at (our choice: 256, the ImageNet protocol; the VAE is
    fully convolutional, diffusers' sample_size is only its training size). Eval mode."""
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{folder} has no config.json (pass a diffusers AutoencoderKL folder, e.g. "
                                f"the vae/ subfolder of a Stable Diffusion or FLUX.1 download)")
    try:
        with open(config_path) as f:
            diffusers_config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_path} is not JSON ({error}); download the folder again") from None
    weights = next((os.path.join(folder, name) for name in WEIGHT_FILES if os.path.isfile(os.path.join(folder, name))),
                   None)
    if weights is None:
        raise FileNotFoundError(f"{folder} has config.json but no {' or '.join(WEIGHT_FILES)} (download the "
                                f"weights beside it; a variant such as .fp16.safetensors must be renamed)")
    model = AutoencoderKL(**config_from_diffusers(diffusers_config, config_path, image_size))
    channels = model.config["latent_channels"]
    scale = float(diffusers_config.get("scaling_factor") or 1.0)
    mean = diffusers_config.get("latents_mean") or [diffusers_config.get("shift_factor") or 0.0] * channels
    std = diffusers_config.get("latents_std") or [1.0] * channels
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"{config_path}: latents_mean / latents_std have {len(mean)} / {len(std)} entries for "
                         f"{channels} latent channels; fix config.json")
    state = read_safetensors(weights) if weights.endswith(".safetensors") else \
        read_weights(weights, "diffusers weight file", "download diffusion_pytorch_model.safetensors again")
    state = convert_diffusers_vae(state, model)
    state["latent_mean"] = torch.tensor(mean, dtype=torch.float32)
    state["latent_std"] = torch.tensor(std, dtype=torch.float32) / scale
    load_state_dict_strict(model, state, weights)
    return model.eval()


def load_tokenizer_or_vae(path, **kwargs):
    """What every command's --tokenizer names: a folder with a config.json is a diffusers
    AutoencoderKL (load_autoencoder_kl), anything else a train_tokenizer.py checkpoint
    (tokenizer.load_tokenizer). Here rather than in tokenizer.py, which this file builds on."""
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
        return load_autoencoder_kl(path)
    return load_tokenizer(path, **kwargs)
