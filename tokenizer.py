"""
The AlignTok tokenizer (arXiv 2509.25162): a DINOv2 encoder, an adapter to a small
latent, and a convolutional decoder.

    image [-1, 1] --resize--> DINOv2 --> patch tokens --> adapter --> z (N, C, h, w)
    z --> decoder --> image [-1, 1]

The file reads top to bottom: the DINOv2 ViT, the adapter, the decoder and the AlignTok
module that joins them; then the stand-in classifier (train_stand_in.py) for runs without DINOv2
weights. Reading weight files (official .pth, Hugging Face safetensors) is in weights.py.
"""
import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from layers import Attention, PatchEmbed, SwiGLU, check_config, constructor_config
from weights import load_state_dict_strict, read_dinov2_weights, read_weights


#################################################################################
#                                 DINOv2 ViT                                    #
#################################################################################

# The official architectures (facebookresearch/dinov2 hubconf). Registers come from
# the "_reg" suffix of the name; every field can be overridden in load_dinov2.
DINOV2_ARCHS = {
    "dinov2_vits14": dict(embed_dim=384, depth=12, num_heads=6, ffn="mlp"),
    "dinov2_vitb14": dict(embed_dim=768, depth=12, num_heads=12, ffn="mlp"),
    "dinov2_vitl14": dict(embed_dim=1024, depth=24, num_heads=16, ffn="mlp"),
    "dinov2_vitg14": dict(embed_dim=1536, depth=40, num_heads=24, ffn="swiglu"),
}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def encoder_input(images, size):
    """Images in [-1, 1] (N, 3, H, W) as a DINOv2 expects them: resized to size x size
    (bicubic, antialias) when needed, then normalised with the ImageNet mean and std."""
    if images.shape[-2:] != (size, size):
        images = F.interpolate(images, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return ((images + 1) / 2 - mean) / std


def check_encoder_size(encoder_size, patch_size):
    """Raised when the model is built, not at its first forward pass."""
    if encoder_size % patch_size:
        raise ValueError(f"encoder_size {encoder_size} is not a multiple of the encoder's patch size {patch_size} "
                         f"(--encoder-size, --encoder-patch)")


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))



class LayerScale(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class ViTBlock(nn.Module):
    def __init__(self, dim, num_heads, ffn):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=True)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        # The official SwiGLU keeps 2/3 of the 4x hidden width, rounded up to a multiple of 8.
        self.mlp = SwiGLU(dim, (int(4 * dim * 2 / 3) + 7) // 8 * 8) if ffn == "swiglu" else Mlp(dim, 4 * dim)
        self.ls2 = LayerScale(dim)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        x = x + self.ls2(self.mlp(self.norm2(x)))
        return x


class DINOv2(nn.Module):
    """The DINOv2 ViT with the official parameter names, so official state dicts load
    as they are. Tokens are [CLS, registers, patches]; registers get no position
    embedding. Position embeddings are stored for the native img_size grid and resized
    for other inputs exactly as the official code does (see interpolate_pos_embed)."""

    def __init__(self, embed_dim=384, depth=12, num_heads=6, ffn="mlp", patch_size=14,
                 img_size=518, num_register_tokens=0):
        self.config = constructor_config(locals())
        super().__init__()
        self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.num_register_tokens = num_register_tokens
        # The official hub models differ in how they resize position embeddings:
        # without registers, scale factor (grid + 0.1) / M and no antialias; with
        # registers, the exact grid size with antialias.
        self.interpolate_offset = 0.0 if num_register_tokens else 0.1
        self.interpolate_antialias = bool(num_register_tokens)
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, 3, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, embed_dim))
        if num_register_tokens:
            self.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
        # Used only by DINOv2's masked pretraining; kept so official files load strictly, and
        # frozen so that DDP does not wait for a gradient it never gets.
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList([ViTBlock(embed_dim, num_heads, ffn) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.grad_checkpoint = False     # set by --grad-checkpoint; not in the config, it changes no result
        self.initialize_weights()

    def initialize_weights(self):
        # As the official code: truncated normal for linear weights and position
        # embeddings, small normal for tokens, LayerScale at 1.0.
        def _init(module):
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.apply(_init)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.num_register_tokens:
            nn.init.normal_(self.register_tokens, std=1e-6)

    def interpolate_pos_embed(self, height, width):
        """Position embeddings (1, 1 + h*w, D) for an input of height x width pixels."""
        grid_h, grid_w = height // self.patch_size, width // self.patch_size
        pos_embed = self.pos_embed.float()
        class_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
        M = int(math.sqrt(patch_pos.shape[1]))
        if (grid_h, grid_w) == (M, M):
            return self.pos_embed
        patch_pos = patch_pos.reshape(1, M, M, -1).permute(0, 3, 1, 2)  # (1, D, M, M)
        # (height, width) order, as the official code (which names the height "w").
        if self.interpolate_offset:
            scale = ((grid_h + self.interpolate_offset) / M, (grid_w + self.interpolate_offset) / M)
            patch_pos = F.interpolate(patch_pos, scale_factor=scale, mode="bicubic",
                                      antialias=self.interpolate_antialias)
        else:
            patch_pos = F.interpolate(patch_pos, size=(grid_h, grid_w), mode="bicubic",
                                      antialias=self.interpolate_antialias)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)
        return torch.cat((class_pos, patch_pos), dim=1).to(self.pos_embed.dtype)

    def forward_features(self, x):
        N, _, H, W = x.shape
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"DINOv2 input size {H}x{W} is not a multiple of the patch size "
                             f"{self.patch_size}; resize the images to a multiple first")
        x = self.patch_embed(x)                                    # (N, h*w, D)
        x = torch.cat((self.cls_token.expand(N, -1, -1), x), dim=1)
        x = x + self.interpolate_pos_embed(H, W)                   # (N, 1 + h*w, D)
        if self.num_register_tokens:
            x = torch.cat((x[:, :1], self.register_tokens.expand(N, -1, -1), x[:, 1:]), dim=1)
        for block in self.blocks:
            # Activation checkpointing keeps only each block's input and recomputes the rest
            # in the backward pass: memory for one more forward.
            if self.grad_checkpoint and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)       # (N, 1 + R + h*w, D)
            else:
                x = block(x)                                       # (N, 1 + R + h*w, D)
        x_norm = self.norm(x)
        R = self.num_register_tokens
        return {
            "x_norm_clstoken": x_norm[:, 0],                       # (N, D)
            "x_norm_regtokens": x_norm[:, 1:R + 1],                # (N, R, D)
            "x_norm_patchtokens": x_norm[:, R + 1:],               # (N, h*w, D)
            "x_prenorm": x,                                        # (N, 1 + R + h*w, D)
        }

    def forward(self, x):
        return self.forward_features(x)["x_norm_clstoken"]


def load_dinov2(name, weights=None, **overrides):
    """Builds a DINOv2 ViT by its torch.hub name ("dinov2_vitl14", "dinov2_vitl14_reg", ...).

    weights: None for random initialisation, or the path of an official .pth state dict
    or a Hugging Face model.safetensors / pytorch_model.bin. overrides change any
    architecture field (depth, embed_dim, num_heads, patch_size, img_size, ...), so that
    small encoders for CPU runs use the same code.
    """
    base = name.removesuffix("_reg")
    if base not in DINOV2_ARCHS:
        raise ValueError(f"unknown DINOv2 model {name!r}; choose one of "
                         + ", ".join(n + s for n in DINOV2_ARCHS for s in ("", "_reg")))
    config = dict(DINOV2_ARCHS[base], patch_size=14, img_size=518,
                  num_register_tokens=4 if name.endswith("_reg") else 0)
    unknown = set(overrides) - set(config)
    if unknown:
        raise ValueError(f"unknown DINOv2 override(s) {sorted(unknown)}; allowed: {sorted(config)}")
    config.update(overrides)
    model = DINOv2(**config)
    if weights is not None:
        load_state_dict_strict(model, read_dinov2_weights(weights), weights)
    return model



#################################################################################
#                                   Adapter                                     #
#################################################################################

class Adapter(nn.Module):
    """Two-layer MLP applied to each patch token: encoder width -> latent channels."""

    def __init__(self, in_dim, latent_channels=32, hidden_dim=None):
        super().__init__()
        hidden_dim = hidden_dim or in_dim
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, latent_channels)
        self.initialize_weights()

    def initialize_weights(self):
        for layer in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, tokens, grid_size):
        z = self.fc2(F.gelu(self.fc1(tokens)))                      # (N, h*w, C)
        h, w = grid_size
        return z.transpose(1, 2).reshape(z.shape[0], -1, h, w)    # (N, C, h, w)


#################################################################################
#                          Decoder (VA-VAE / LDM style)                         #
#################################################################################

def group_norm(channels):
    return nn.GroupNorm(num_groups=min(32, channels), num_channels=channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.shortcut(x) + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of a feature map, with the project's
    one Attention on the flattened map."""

    def __init__(self, channels):
        super().__init__()
        self.norm = group_norm(channels)
        self.attn = Attention(channels, num_heads=1)

    def forward(self, x):
        N, C, H, W = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)               # (N, H*W, C)
        h = self.attn(h).transpose(1, 2).reshape(N, C, H, W)
        return x + h


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Decoder(nn.Module):
    """The LDM / VA-VAE convolutional decoder. With the defaults (width 128, multipliers
    (1, 1, 2, 2, 4), two residual blocks per level, attention at the latent resolution)
    it maps a 16x16x32 latent to a 256x256 image with about 41.4M parameters.

    As in LDM, each level of the upsampling path has res_blocks + 1 residual blocks and
    every level but the last upsamples by 2, so the image is 2**(len(multipliers) - 1)
    times larger than the latent. level_attention=False keeps attention to the middle block
    alone, as the SD and FLUX VAEs (vae.py)."""

    def __init__(self, latent_channels=32, width=128, multipliers=(1, 1, 2, 2, 4), res_blocks=2,
                 level_attention=True):
        super().__init__()
        channels = width * multipliers[-1]
        self.conv_in = nn.Conv2d(latent_channels, channels, 3, padding=1)
        self.mid = nn.Sequential(ResnetBlock(channels, channels), AttentionBlock(channels),
                                 ResnetBlock(channels, channels))
        levels = []
        for level, multiplier in reversed(list(enumerate(multipliers))):
            out_channels = width * multiplier
            layers = []
            for _ in range(res_blocks + 1):
                layers.append(ResnetBlock(channels, out_channels))
                channels = out_channels
                if level_attention and level == len(multipliers) - 1:  # attention only at the latent resolution
                    layers.append(AttentionBlock(channels))
            if level != 0:
                layers.append(Upsample(channels))
            levels.append(nn.Sequential(*layers))
        self.up = nn.Sequential(*levels)
        self.norm_out = group_norm(channels)
        self.conv_out = nn.Conv2d(channels, 3, 3, padding=1)
        self.initialize_weights()

    def initialize_weights(self):
        # Convolutions and the attention's linear layers keep PyTorch's default init, as in
        # LDM; GroupNorm starts as the identity.
        for module in self.modules():
            if isinstance(module, nn.GroupNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @property
    def last_layer(self):
        """The weight the adaptive GAN weight takes its gradients against."""
        return self.conv_out.weight

    def forward(self, z):
        x = self.conv_in(z)                                         # (N, W*m[-1], h, w)
        x = self.mid(x)
        x = self.up(x)                                              # (N, W*m[0], H, W)
        return self.conv_out(F.silu(self.norm_out(x)))              # (N, 3, H, W)


#################################################################################
#                              The AlignTok tokenizer                           #
#################################################################################

class AlignTok(nn.Module):
    """DINOv2 encoder + adapter + decoder.

    encode: image [-1, 1] (N, 3, H, W) -> resize to encoder_size (bicubic, antialias)
            -> ImageNet normalisation -> DINOv2 patch tokens -> adapter -> z (N, C, h, w)
    decode: z -> image [-1, 1] (N, 3, H, W)

    z is deterministic (no KL, no sampling). The per-channel latent statistics that the
    DiT normalises with live in the buffers latent_mean / latent_std, saved with the model.
    `config` holds every constructor argument, so a checkpoint rebuilds the model alone.
    """

    def __init__(self, encoder_name="dinov2_vitl14", encoder_overrides=None, latent_channels=32,
                 adapter_hidden=None, decoder_width=128, decoder_multipliers=(1, 1, 2, 2, 4),
                 decoder_res_blocks=2, image_size=256, encoder_size=224):
        config = constructor_config(locals())
        super().__init__()
        self.config = config
        self.encoder = load_dinov2(encoder_name, **(encoder_overrides or {}))
        check_encoder_size(encoder_size, self.encoder.patch_size)
        self.image_size, self.encoder_size = image_size, encoder_size
        self.grid_size = (encoder_size // self.encoder.patch_size,) * 2
        upsampling = 2 ** (len(decoder_multipliers) - 1)
        if self.grid_size[0] * upsampling != image_size:
            raise ValueError(f"the decoder maps a {self.grid_size[0]}x{self.grid_size[0]} latent to "
                             f"{self.grid_size[0] * upsampling} px, not image_size {image_size}; change "
                             f"the decoder multipliers or encoder_size")
        self.adapter = Adapter(self.encoder.embed_dim, latent_channels, adapter_hidden)
        self.decoder = Decoder(latent_channels, decoder_width, decoder_multipliers, decoder_res_blocks)
        self.register_buffer("latent_mean", torch.zeros(latent_channels))
        self.register_buffer("latent_std", torch.ones(latent_channels))

    def encoder_tokens(self, images):
        """DINOv2's final-LayerNorm patch tokens (N, h*w, D) of images in [-1, 1]."""
        x = encoder_input(images, self.encoder_size)                  # (N, 3, S, S)
        return self.encoder.forward_features(x)["x_norm_patchtokens"]

    def encode(self, images):
        return self.adapter(self.encoder_tokens(images), self.grid_size)   # (N, C, h, w)

    def decode(self, z):
        return self.decoder(z)                                              # (N, 3, H, W)

    def forward(self, images):
        """Returns the reconstruction, the latent and the encoder tokens (the last for
        semantic preservation placed before the adapter)."""
        tokens = self.encoder_tokens(images)                                # (N, h*w, D)
        z = self.adapter(tokens, self.grid_size)                            # (N, C, h, w)
        return self.decoder(z), z, tokens

    def normalize(self, z):
        """(N, C, h, w) latents to the per-channel standardised ones the DiT trains on."""
        return (z - self.latent_mean.view(1, -1, 1, 1)) / self.latent_std.view(1, -1, 1, 1)

    def denormalize(self, z):
        return z * self.latent_std.view(1, -1, 1, 1) + self.latent_mean.view(1, -1, 1, 1)

    def set_trainable(self, stage):
        """Which parts learn in each stage (the paper's table)."""
        self.requires_grad_(False)
        for name in {1: ("adapter", "decoder"), 2: ("encoder", "adapter", "decoder"), 3: ("decoder",)}[stage]:
            getattr(self, name).requires_grad_(True)
        self.encoder.mask_token.requires_grad_(False)   # unused outside DINOv2's own pretraining
        return self

    def frozen_reference(self):
        """Stage 2's frozen copy of the stage-1 encoder + adapter (no decoder), the target of
        semantic preservation."""
        reference = copy.deepcopy(self)
        del reference.decoder
        return reference.requires_grad_(False).eval()


def load_tokenizer(path, use_ema=True, finished_only=False):
    """Rebuilds an AlignTok from a train_tokenizer.py checkpoint alone (eval mode, the
    EMA weights unless use_ema=False). finished_only: refuse a stage stopped before the end
    of its steps or of its latent statistics (the DiT needs both)."""
    checkpoint = read_weights(path, "tokenizer checkpoint", "train one with train_tokenizer.py --stage 1/2/3 "
                                                            "and pass its checkpoint.pt")
    if "tokenizer_config" not in checkpoint:
        raise ValueError(f"{path} is not a tokenizer checkpoint (train_stand_in.py checkpoints hold only the "
                         f"stand-in encoder, DiT checkpoints a LightningDiT; pass the checkpoint of "
                         f"train_tokenizer.py stage 1, 2 or 3)")
    if finished_only and checkpoint.get("finished") is False:
        raise ValueError(f"{path} is an unfinished stage-{checkpoint['stage']} run (step {checkpoint['step']} of "
                         f"{checkpoint['args']['steps']}, or its latent statistics not computed); finish it first "
                         f"with its train_tokenizer.py command plus --resume")
    model = AlignTok(**check_config(AlignTok, checkpoint["tokenizer_config"], path))
    load_state_dict_strict(model, checkpoint["ema" if use_ema else "model"], path)
    return model.eval()



#################################################################################
#              Stand-in encoder (stage 0, when no DINOv2 weights exist)         #
#################################################################################

class EncoderClassifier(nn.Module):
    """A DINOv2-architecture encoder with a linear classifier on [CLS, mean patch token].
    train_stand_in.py trains it on the data set's labels so that a small
    encoder carries semantics on CPU runs; it stands in for the pretrained DINOv2, and
    its classifier later judges whether generated samples show their class."""

    def __init__(self, encoder_config, num_classes, encoder_size):
        self.config = constructor_config(locals())
        super().__init__()
        self.encoder_size = encoder_size
        self.encoder = DINOv2(**encoder_config)
        check_encoder_size(encoder_size, self.encoder.patch_size)
        self.head = nn.Linear(2 * self.encoder.embed_dim, num_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def features(self, images):
        """[CLS, mean patch token] (N, 2D) of images in [-1, 1]."""
        out = self.encoder.forward_features(encoder_input(images, self.encoder_size))
        return torch.cat((out["x_norm_clstoken"], out["x_norm_patchtokens"].mean(1)), dim=1)

    def forward(self, images):
        return self.head(self.features(images))                     # (N, classes)


def load_stand_in(path):
    """The stage-0 EncoderClassifier from its checkpoint (eval mode)."""
    return stand_in_from_checkpoint(read_weights(path, "stage-0 checkpoint", "run train_stand_in.py"),
                                    path)


def stand_in_from_checkpoint(checkpoint, source):
    """The EncoderClassifier of an already loaded stage-0 checkpoint (eval mode)."""
    if checkpoint.get("stage") != 0:
        raise ValueError(f"{source} is not a stage-0 checkpoint (it has no stand-in encoder classifier)")
    model = EncoderClassifier(**check_config(EncoderClassifier, checkpoint["stand_in_config"], source))
    load_state_dict_strict(model, checkpoint["ema"], source)
    return model.eval()
