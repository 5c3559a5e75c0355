"""
The building blocks that the tokenizer, the DiT and the losses share: the one attention
of the project (with optional QK-norm and rotary embedding), SwiGLU, the patch embedding
and the one way a model records its constructor arguments.
Nothing here knows about AlignTok; every model file imports from here, never the reverse.
"""
import copy
import inspect

import torch
import torch.nn as nn
import torch.nn.functional as F


#################################################################################
#                       Constructor arguments as the saved config               #
#################################################################################

def constructor_config(arguments):
    """A model's config: its constructor's own arguments, taken from locals() as the first
    statement of __init__. Checkpoints store it and rebuild the model with Model(**config),
    so an argument added to __init__ is saved without a second list that could drift."""
    return {name: copy.deepcopy(value) for name, value in arguments.items() if name not in ("self", "__class__")}


def check_config(model_class, config, source):
    """Refuses a saved config with arguments the constructor does not take (one line)."""
    unknown = set(config) - set(inspect.signature(model_class).parameters)
    if unknown:
        raise ValueError(f"{source}: unknown {model_class.__name__} config field(s) {sorted(unknown)}")
    return config


#################################################################################
#                                   Attention                                   #
#################################################################################

def apply_rope(x, cos, sin):
    """Rotates adjacent pairs of channels (x[2i], x[2i+1]) of x (N, H, T, Dh) by the
    angles whose cos/sin are given per token and pair, shape (T, Dh // 2)."""
    x_even, x_odd = x[..., 0::2], x[..., 1::2]
    rotated_even = x_even * cos - x_odd * sin
    rotated_odd = x_even * sin + x_odd * cos
    return torch.stack((rotated_even, rotated_odd), dim=-1).flatten(-2)


class Attention(nn.Module):
    """Multi-head self-attention, the one attention of the project.

    Optional QK-norm (RMSNorm per head on q and k, applied before RoPE) and optional
    rotary embedding given as a (cos, sin) pair at call time. There is no branching on
    tensor values, so the module compiles with torch.compile(fullgraph=True).
    """

    def __init__(self, dim, num_heads, qkv_bias=True, qk_norm=False):
        super().__init__()
        assert dim % num_heads == 0, f"dim {dim} is not divisible by num_heads {num_heads}"
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rope=None):
        N, T, D = x.shape
        qkv = self.qkv(x).reshape(N, T, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)          # each (N, H, T, Dh)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        x = F.scaled_dot_product_attention(q, k, v)               # (N, H, T, Dh)
        x = x.transpose(1, 2).reshape(N, T, D)                    # (N, T, D)
        return self.proj(x)



#################################################################################
#                          Feed-forward and patch embedding                     #
#################################################################################

class SwiGLU(nn.Module):
    """SwiGLU MLP with one fused input projection (w12) split into gate and value; the
    giant DINOv2's MLP and LightningDiT's."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x):
        gate, value = self.w12(x).chunk(2, dim=-1)                  # each (N, T, hidden)
        return self.w3(F.silu(gate) * value)                        # (N, T, D)


class PatchEmbed(nn.Module):
    """Non-overlapping patches to tokens (DINOv2's image patches, the DiT's latent patches)."""

    def __init__(self, patch_size, in_channels, dim):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)           # (N, h*w, D)
