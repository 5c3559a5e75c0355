"""The in-house DINOv2 against transformers' Dinov2Model, the official interpolation and
the official key layout. All weights are random; nothing is downloaded."""
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

from tokenizer import load_dinov2


def hf_model(registers, hidden, layers, heads, swiglu=False):
    torch.manual_seed(0)
    common = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  intermediate_size=4 * hidden, image_size=518, patch_size=14, layer_norm_eps=1e-6)
    if registers:
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=4, **common))
    else:
        model = Dinov2Model(Dinov2Config(use_swiglu_ffn=swiglu, **common))
    # Random, non-trivial values everywhere (the default init leaves some tensors at 0 or 1).
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(0.05 * torch.randn_like(p)) if "lambda1" in name or "norm" in name else None
        model.embeddings.cls_token.normal_(std=0.5)
        model.embeddings.position_embeddings.normal_(std=0.5)
        if registers:
            model.embeddings.register_tokens.normal_(std=0.5)
    return model.eval()


def compare_with_hf(hf, ours, size):
    torch.manual_seed(1)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        out = hf(pixel_values=x, output_hidden_states=True)
        mine = ours.eval().forward_features(x)
    R = ours.num_register_tokens
    expected = {
        "x_norm_clstoken": out.last_hidden_state[:, 0],
        "x_norm_regtokens": out.last_hidden_state[:, 1:R + 1],
        "x_norm_patchtokens": out.last_hidden_state[:, R + 1:],
        "x_prenorm": out.hidden_states[-1],
    }
    for key, value in expected.items():
        assert mine[key].shape == value.shape, key
        if value.numel() == 0:
            continue
        error = (mine[key] - value).abs().max().item()
        assert error < 1e-4, f"{key}: max abs error {error}"


@pytest.mark.parametrize("registers,fmt", [(False, "safetensors"), (True, "bin")])
def test_parity_small_config(tmp_path, registers, fmt):
    hf = hf_model(registers, hidden=64, layers=2, heads=4)
    path = tmp_path / ("model.safetensors" if fmt == "safetensors" else "pytorch_model.bin")
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(path))
    else:
        torch.save({"dinov2." + k: v for k, v in hf.state_dict().items()}, path)
    name = "dinov2_vits14_reg" if registers else "dinov2_vits14"
    ours = load_dinov2(name, str(path), embed_dim=64, depth=2, num_heads=4)
    compare_with_hf(hf, ours, 518)


@pytest.mark.parametrize("registers", [False, True])
def test_parity_vits14_size(tmp_path, registers):
    hf = hf_model(registers, hidden=384, layers=12, heads=6)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(path))
    ours = load_dinov2("dinov2_vits14_reg" if registers else "dinov2_vits14", str(path))
    compare_with_hf(hf, ours, 518)


def test_giant_swiglu_layout_loads_and_runs(tmp_path):
    # Giant's fused SwiGLU (w12 / w3, hidden 4096 at width 1536), against the HF port.
    hf = hf_model(False, hidden=96, layers=1, heads=4, swiglu=True)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(path))
    ours = load_dinov2("dinov2_vitg14", str(path), embed_dim=96, depth=1, num_heads=4)
    assert ours.blocks[0].mlp.w12.weight.shape == (2 * 256, 96)  # 4 * 96 * 2/3 = 256
    compare_with_hf(hf, ours, 518)
    real_width = load_dinov2("dinov2_vitg14", depth=1)
    assert real_width.blocks[0].mlp.w12.weight.shape == (2 * 4096, 1536)
    assert real_width.blocks[0].mlp.w3.weight.shape == (1536, 4096)
    out = real_width.forward_features(torch.randn(1, 3, 28, 28))
    assert out["x_norm_patchtokens"].shape == (1, 4, 1536)


def official_keys(depth, registers, swiglu=False):
    keys = {"cls_token", "pos_embed", "mask_token", "patch_embed.proj.weight", "patch_embed.proj.bias",
            "norm.weight", "norm.bias"} | ({"register_tokens"} if registers else set())
    mlp = ("mlp.w12", "mlp.w3") if swiglu else ("mlp.fc1", "mlp.fc2")
    for i in range(depth):
        for part in ("norm1", "attn.qkv", "attn.proj", "norm2") + mlp:
            keys |= {f"blocks.{i}.{part}.weight", f"blocks.{i}.{part}.bias"}
        keys |= {f"blocks.{i}.ls1.gamma", f"blocks.{i}.ls2.gamma"}
    return keys


def test_round_trip_official_layout(tmp_path):
    torch.manual_seed(0)
    model = load_dinov2("dinov2_vits14_reg", depth=2).eval()
    state = model.state_dict()
    assert set(state) == official_keys(2, registers=True)
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(state, path)
    reloaded = load_dinov2("dinov2_vits14_reg", str(path), depth=2).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        a, b = model.forward_features(x), reloaded.forward_features(x)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_strict_loading_names_the_problem(tmp_path):
    state = load_dinov2("dinov2_vits14", depth=1).state_dict()
    del state["blocks.0.ls1.gamma"]
    state["blocks.0.attn.qkv.weight"] = torch.zeros(3, 3)
    state["head.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(RuntimeError) as error:
        load_dinov2("dinov2_vits14", str(path), depth=1)
    message = str(error.value)
    for expected in ("blocks.0.ls1.gamma", "head.weight", "blocks.0.attn.qkv.weight", str(path)):
        assert expected in message
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_dinov2("dinov2_vits14", str(tmp_path / "nowhere.pth"))
    with pytest.raises(ValueError, match="unknown DINOv2 model"):
        load_dinov2("dinov2_vitx14")


def test_size_not_multiple_of_patch():
    model = load_dinov2("dinov2_vits14", depth=1)
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        model.forward_features(torch.randn(1, 3, 225, 224))


# --- position-embedding interpolation, stated independently in numpy -----------

def cubic_weight(x, a):
    x = abs(x)
    if x <= 1:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


def resize_matrix_offset(in_size, out_size, scale):
    """Official DINOv2 without registers: bicubic (a = -0.75), no antialias, with the
    sampling step 1/scale where scale = (grid + 0.1) / M: source = (i + 0.5) / scale - 0.5,
    four taps clamped at the border."""
    matrix = np.zeros((out_size, in_size))
    for i in range(out_size):
        source = (i + 0.5) / scale - 0.5
        base = int(np.floor(source))
        for tap in range(base - 1, base + 3):
            matrix[i, min(max(tap, 0), in_size - 1)] += cubic_weight(source - tap, -0.75)
    return matrix


def resize_matrix_antialias(in_size, out_size):
    """Official DINOv2 with registers: exact output size with antialias, i.e. the
    PIL-style filter (bicubic a = -0.5) stretched by in/out and renormalised."""
    scale = in_size / out_size
    support = 2 * scale
    matrix = np.zeros((out_size, in_size))
    for i in range(out_size):
        center = scale * (i + 0.5)
        for j in range(max(int(center - support + 0.5), 0), min(int(center + support + 0.5), in_size)):
            matrix[i, j] = cubic_weight((j + 0.5 - center) / scale, -0.5)
        matrix[i] /= matrix[i].sum()
    return matrix


@pytest.mark.parametrize("registers", [False, True])
def test_pos_embed_interpolation_matches_official(registers):
    torch.manual_seed(0)
    model = load_dinov2("dinov2_vits14_reg" if registers else "dinov2_vits14", depth=1, embed_dim=8, num_heads=2)
    table = model.pos_embed.detach()[0, 1:].reshape(37, 37, 8).double().numpy()
    if registers:
        rows = resize_matrix_antialias(37, 16)
    else:
        rows = resize_matrix_offset(37, 16, 16.1 / 37)
    expected = np.einsum("ij,kl,jlc->ikc", rows, rows, table).reshape(256, 8)
    got = model.interpolate_pos_embed(224, 224)[0, 1:].detach().double().numpy()
    assert np.abs(got - expected).max() < 1e-5
    # The two families really differ, so the test above can tell them apart.
    other = resize_matrix_offset(37, 16, 16.1 / 37) if registers else resize_matrix_antialias(37, 16)
    assert np.abs(np.einsum("ij,kl,jlc->ikc", other, other, table).reshape(256, 8) - got).max() > 1e-2
    assert torch.equal(model.interpolate_pos_embed(224, 224)[0, 0], model.pos_embed[0, 0])


def test_compiles_fullgraph():
    torch.manual_seed(0)
    model = load_dinov2("dinov2_vits14_reg", depth=2, embed_dim=64, num_heads=4).eval()
    compiled = torch.compile(model.forward_features, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        eager, graph = model.forward_features(x), compiled(x)
    for key in eager:
        torch.testing.assert_close(graph[key], eager[key], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("registers", [False, True])
def test_parity_at_224_px_where_position_embeddings_are_resized(tmp_path, registers):
    """At 224 px (16x16 patches from a 37x37 table), the tokenizer's size. Hugging Face's
    `_reg` port resizes as the official code does, so the whole model must match. Its
    no-register port resizes to the exact grid instead of the official (grid + 0.1) / 37
    scale; there its resize is swapped for ours (checked against the official statement
    in test_pos_embed_interpolation_matches_official), and everything else must match."""
    hf = hf_model(registers, hidden=64, layers=2, heads=4)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(path))
    ours = load_dinov2("dinov2_vits14_reg" if registers else "dinov2_vits14", str(path), embed_dim=64, depth=2,
                       num_heads=4)
    if not registers:
        hf.embeddings.interpolate_pos_encoding = lambda embeddings, h, w: ours.interpolate_pos_embed(h, w)
    compare_with_hf(hf, ours, 224)
