"""
LightningDiT, the class-conditional flow model trained on AlignTok latents, with its
flow-matching loss and samplers.

    latent x (N, C, H, W) --patchify--> tokens (N, T, D) + fixed 2D sin-cos table
    c = t_emb(t) + y_emb(y)
    tokens --[adaLN-Zero block: RMSNorm, attention with 2D RoPE, SwiGLU] x depth-->
    final adaLN layer --unpatchify--> velocity v (N, C, H, W)

Convention (LightningDiT's): t in [0, 1], t=0 is noise and t=1 is data,
x_t = t*x + (1-t)*eps, and the network predicts v = x - eps.

The file reads top to bottom: embeddings, 2D RoPE, the transformer, model sizes,
the loss, the samplers and checkpoint loading.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from layers import Attention, PatchEmbed, SwiGLU, check_config, constructor_config
from weights import load_state_dict_strict, read_weights


#################################################################################
#                                  Embeddings                                   #
#################################################################################

def sincos_1d(dim, pos):
    """Sin-cos features (len(pos), dim) of positions pos, frequencies 1/10000^(i/(dim/2))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = pos.to(torch.float64)[:, None] * omega[None]             # (T, dim/2)
    return torch.cat((torch.sin(angles), torch.cos(angles)), dim=1)    # (T, dim)


def sincos_2d(dim, grid_size):
    """The fixed 2D position table (grid_size**2, dim), tokens in row-major order.
    As DiT (and so LightningDiT): the first half of the dims encodes the column index,
    the second half the row index, so released position tables match ours."""
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    emb = torch.cat((sincos_1d(dim // 2, cols.flatten()), sincos_1d(dim // 2, rows.flatten())), dim=1)
    return emb.float()


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t followed by an MLP. t in [0, 1] goes in as it is (no
    x1000 as in DiT): LightningDiT's flow models are trained that way."""

    def __init__(self, dim, frequency_size=256, max_period=10000):
        super().__init__()
        self.frequency_size = frequency_size
        self.max_period = max_period
        self.mlp = nn.Sequential(nn.Linear(frequency_size, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        half = self.frequency_size // 2
        freqs = torch.exp(-math.log(self.max_period)
                          * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]                        # (N, half)
        features = torch.cat((torch.cos(args), torch.sin(args)), dim=1)  # (N, frequency_size)
        return self.mlp(features.to(self.mlp[0].weight.dtype))        # (N, D)


class LabelEmbedder(nn.Module):
    """Class table with num_classes + 1 rows; the last row is the null class that label
    dropout (drop_labels) and classifier-free guidance use."""

    def __init__(self, num_classes, dim):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, y):
        return self.embedding_table(y)                                 # (N, D)


def drop_labels(y, prob, num_classes, generator=None):
    """Replaces each label by the null class (num_classes) with probability prob."""
    drop = torch.rand(y.shape, generator=generator, device=y.device) < prob
    return torch.where(drop, torch.full_like(y, num_classes), y)


#################################################################################
#                                    2D RoPE                                    #
#################################################################################

def rope_2d(grid_size, head_dim, theta=10000.0):
    """(cos, sin), each (grid_size**2, head_dim // 2), for layers.apply_rope, which
    rotates adjacent channel pairs. The first half of the pairs turns with the row
    index, the second half with the column index, each half with the frequencies
    theta^(-i / (head_dim / 4)), as in LightningDiT (EVA-02's 2D rotary embedding)."""
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs a head dim divisible by 4, got {head_dim}; "
                         f"change hidden_size / num_heads or pass use_rope=False")
    quarter = head_dim // 4
    freqs = theta ** (-torch.arange(quarter, dtype=torch.float64) / quarter)   # (Dh/4,)
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    angles = torch.cat((rows.flatten().double()[:, None] * freqs,
                        cols.flatten().double()[:, None] * freqs), dim=1)       # (T, Dh/2)
    return torch.cos(angles).float(), torch.sin(angles).float()


#################################################################################
#                                  Transformer                                  #
#################################################################################

def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class LightningDiTBlock(nn.Module):
    """adaLN-Zero block: the conditioning c gives shift, scale and gate for both the
    attention and the MLP branch; the gates start at zero so each block starts as the
    identity. RMSNorm replaces DiT's LayerNorm; its weight is learnable and sits under
    the modulation."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qk_norm=False):
        super().__init__()
        self.norm1 = nn.RMSNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=True, qk_norm=qk_norm)
        self.norm2 = nn.RMSNorm(dim, eps=1e-6)
        # 2/3 keeps the parameter count of a 4x GELU MLP (3072 for dim 1152).
        self.mlp = SwiGLU(dim, int(2 / 3 * mlp_ratio * dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c, rope=None):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = \
            self.adaLN_modulation(c).chunk(6, dim=1)                   # each (N, D)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x                                                       # (N, T, D)


class FinalLayer(nn.Module):
    def __init__(self, dim, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.RMSNorm(dim, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)        # each (N, D)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (N, T, p*p*C)


class LightningDiT(nn.Module):
    """Class-conditional flow transformer on latents of input_size x input_size x
    in_channels. forward(x, t, y) returns the velocity v = x - eps at time t."""

    def __init__(self, input_size=16, patch_size=1, in_channels=32, hidden_size=1152,
                 depth=28, num_heads=16, mlp_ratio=4.0, num_classes=1000, qk_norm=False,
                 use_rope=True):
        config = constructor_config(locals())
        super().__init__()
        self.config = config
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not a multiple of patch_size {patch_size}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.use_rope = use_rope
        grid = input_size // patch_size

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        # A frozen parameter rather than a buffer: that is how DiT/LightningDiT store it,
        # so it is in their state dicts and in the published parameter counts.
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([LightningDiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm)
                                     for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels)
        # Derived from the config alone, so kept out of the state dict.
        cos, sin = rope_2d(grid, hidden_size // num_heads) if use_rope else (torch.zeros(0), torch.zeros(0))
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.grad_checkpoint = False     # set by --grad-checkpoint; not in the config, it changes no result
        self.initialize_weights()

    def initialize_weights(self):
        # DiT's init: xavier linears with zero bias, patch embedding as a linear,
        # small normal embeddings, and zero adaLN modulation and output layer so that
        # every block starts as the identity and the model outputs exactly zero.
        def _init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        self.apply(_init)
        grid = self.input_size // self.patch_size
        with torch.no_grad():
            self.pos_embed.copy_(sincos_2d(self.pos_embed.shape[-1], grid).unsqueeze(0))
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x):
        N, p, C = x.shape[0], self.patch_size, self.in_channels
        h = w = self.input_size // p
        x = x.reshape(N, h, w, p, p, C)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(N, C, h * p, w * p)                           # (N, C, H, W)

    def forward(self, x, t, y):
        """x (N, C, H, W) latent at time t, t (N,) in [0, 1] (or one value for all),
        y (N,) class labels in [0, num_classes], num_classes being the null class."""
        N, C, H, W = x.shape
        if (C, H, W) != (self.in_channels, self.input_size, self.input_size):
            raise ValueError(f"LightningDiT built for latents {self.in_channels}x{self.input_size}x"
                             f"{self.input_size}, got {C}x{H}x{W}; build the model with matching "
                             f"in_channels / input_size")
        t = t.reshape(-1).expand(N)
        x = self.x_embedder(x) + self.pos_embed                        # (N, T, D)
        c = self.t_embedder(t) + self.y_embedder(y)                    # (N, D)
        rope = (self.rope_cos, self.rope_sin) if self.use_rope else None
        for block in self.blocks:
            # Activation checkpointing keeps only each block's input and recomputes the rest
            # in the backward pass: memory for one more forward.
            if self.grad_checkpoint and torch.is_grad_enabled():
                x = checkpoint(block, x, c, rope, use_reentrant=False)  # (N, T, D)
            else:
                x = block(x, c, rope)                                  # (N, T, D)
        x = self.final_layer(x, c)                                     # (N, T, p*p*C)
        return self.unpatchify(x)                                      # (N, C, H, W)


#################################################################################
#                                  Model sizes                                  #
#################################################################################

# depth, hidden size, heads (LightningDiT / DiT sizes); the patch comes from "/1", "/2".
DIT_SIZES = {
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}
DIT_NAMES = [f"LightningDiT-{size}/{patch}" for size in DIT_SIZES for patch in (1, 2)]


def create_model(name, **overrides):
    """Builds a LightningDiT by name ("LightningDiT-XL/1", ...). overrides change any
    constructor argument (input_size, in_channels, num_classes, qk_norm, depth, ...)."""
    if name not in DIT_NAMES:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(DIT_NAMES)}")
    size, patch = name.removeprefix("LightningDiT-").split("/")
    config = dict(input_size=16, patch_size=int(patch), in_channels=32, mlp_ratio=4.0,
                  num_classes=1000, qk_norm=False, use_rope=True, **DIT_SIZES[size])
    unknown = set(overrides) - set(config)
    if unknown:
        raise ValueError(f"unknown LightningDiT override(s) {sorted(unknown)}; allowed: {sorted(config)}")
    config.update(overrides)
    return LightningDiT(**config)


#################################################################################
#                                 Flow matching                                 #
#################################################################################

def flow_loss(model, x, y, cosine_weight=1.0, generator=None):
    """LightningDiT's loss on clean latents x (N, C, H, W) with labels y (N,):
    MSE(v_hat, v) + cosine_weight * mean over pixels of (1 - cos(v_hat, v)) with the
    cosine taken over channels; t is logit-normal (sigmoid of N(0, 1)).
    Returns (loss, {"mse": ..., "cosine": ...}), the parts detached."""
    N = x.shape[0]
    t = torch.sigmoid(torch.randn(N, generator=generator, device=x.device, dtype=x.dtype))
    eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    t_ = t.view(N, 1, 1, 1)
    x_t = t_ * x + (1 - t_) * eps                                      # (N, C, H, W)
    v = x - eps
    v_hat = model(x_t, t, y)                                           # (N, C, H, W)
    mse = F.mse_loss(v_hat.float(), v.float())
    cosine = (1 - F.cosine_similarity(v_hat.float(), v.float(), dim=1)).mean()
    loss = mse + cosine_weight * cosine
    return loss, {"mse": mse.detach(), "cosine": cosine.detach()}


def shift_time(t, shift):
    """t' = s*t / (1 + (s-1)*t): s < 1 puts more of a uniform grid near t=0 (noise)."""
    return shift * t / (1 + (shift - 1) * t)


#################################################################################
#                                   Sampling                                    #
#################################################################################

def guided_velocity(model, x, t, y, cfg_scale, cfg_interval, cfg_channels, null_label):
    """model's velocity at (x, t), with classifier-free guidance v_u + w*(v_c - v_u) on
    the first cfg_channels channels (all if None) where t >= cfg_interval; elsewhere
    the conditional prediction alone. Cond and uncond run as one batch, and the unconditional
    half is skipped where no sample is inside the interval (a quarter of the demo's steps)."""
    N = x.shape[0]
    t = t.expand(N)
    inside = t >= cfg_interval                                          # (N,)
    if cfg_scale == 1.0 or not inside.any():
        return model(x, t, y)
    y_null = torch.full_like(y, null_label)
    v_cond, v_uncond = model(torch.cat((x, x)), torch.cat((t, t)), torch.cat((y, y_null))).chunk(2)
    guided = v_uncond + cfg_scale * (v_cond - v_uncond)                # (N, C, H, W)
    if cfg_channels is not None:
        guided = torch.cat((guided[:, :cfg_channels], v_cond[:, cfg_channels:]), dim=1)
    return torch.where(inside.view(N, 1, 1, 1), guided, v_cond)


@torch.no_grad()
def sample(model, noise, y, steps=50, method="euler", cfg_scale=1.0, cfg_interval=0.0,
           shift=0.3, cfg_channels=None, trajectory=None):
    """Integrates dx/dt = v(x, t, y) from noise at t=0 to data at t=1.

    model: any callable model(x, t, y) -> v (a LightningDiT, or an analytic field);
        guidance needs model.num_classes, the null label.
    steps: the number of model evaluations (per sample, not counting the doubled batch
        of guidance). Euler: `steps` intervals. Heun: ceil(steps / 2) intervals, each a
        Heun step (2 evaluations) except, when steps is odd, the last, which is an
        Euler step. So both methods cost exactly `steps` evaluations. (LightningDiT's
        released "250 steps" are 250 grid points, i.e. 249 Euler evaluations.)
    The grid is shift_time(linspace(0, 1, intervals + 1), shift).
    cfg_scale: guidance weight w (1.0: no guidance and no unconditional pass).
    cfg_interval: guidance only where the (shifted) t >= this value.
    cfg_channels: guide only the first cfg_channels channels (3 reproduces the released
        LightningDiT); None guides all channels.
    trajectory: a list to which (t, predicted clean latent) is appended at each grid point,
        the prediction x_t + (1 - t) v (x_t = t x + (1-t) eps and v = x - eps give x);
        at t = 1 it is the sample itself.
    """
    if method not in ("euler", "heun"):
        raise ValueError(f"unknown sampling method {method!r}; use 'euler' or 'heun'")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    null_label = getattr(model, "num_classes", None)
    if cfg_scale != 1.0 and null_label is None:
        raise ValueError("classifier-free guidance needs model.num_classes (the null label)")
    intervals = steps if method == "euler" else (steps + 1) // 2
    grid = torch.linspace(0, 1, intervals + 1, dtype=torch.float64)
    grid = shift_time(grid, shift).to(device=noise.device, dtype=noise.dtype)

    def velocity(x, t):
        return guided_velocity(model, x, t.reshape(1), y, cfg_scale, cfg_interval, cfg_channels, null_label)

    x = noise
    for i in range(intervals):
        t_cur, t_next = grid[i], grid[i + 1]
        dt = t_next - t_cur
        v_cur = velocity(x, t_cur)
        if trajectory is not None:
            trajectory.append((t_cur.item(), x + (1 - t_cur) * v_cur))
        x_euler = x + dt * v_cur
        heun_step = method == "heun" and 2 * (i + 1) <= steps
        if heun_step:
            x = x + dt * 0.5 * (v_cur + velocity(x_euler, t_next))
        else:
            x = x_euler
    if trajectory is not None:
        trajectory.append((1.0, x))
    return x


#################################################################################
#                               Checkpoint loading                              #
#################################################################################

def load_dit(path, use_ema=True):
    """Rebuilds a LightningDiT from a diffusion training checkpoint with keys
    "model_config", "model" and "ema". Returns (model in eval mode, checkpoint)."""
    ckpt = read_weights(path, "DiT checkpoint", "pass the checkpoint.pt written by train_diffusion.py")
    weights_key = "ema" if use_ema else "model"
    missing = [k for k in ("model_config", weights_key) if k not in ckpt]
    if missing:
        raise ValueError(f"{path} lacks {missing}: it is not a train_diffusion.py checkpoint"
                         + (" (or was saved without EMA; pass use_ema=False)" if weights_key in missing else "")
                         + ("; it is a tokenizer checkpoint" if "tokenizer_config" in ckpt else ""))
    model = LightningDiT(**check_config(LightningDiT, ckpt["model_config"], path))
    load_state_dict_strict(model, ckpt[weights_key], f"{path} [{weights_key}]")
    return model.eval(), ckpt
