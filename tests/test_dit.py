"""Tests for dit.py: the LightningDiT model, 2D RoPE, the flow loss and the samplers.
CPU only, small configs (the real sizes only on the meta device)."""
import pytest
import torch

from dit import (LightningDiT, create_model, drop_labels, flow_loss, load_dit, rope_2d, sample,
                 shift_time)
from layers import apply_rope


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(**overrides):
    config = dict(input_size=4, patch_size=1, in_channels=4, hidden_size=64, depth=2, num_heads=2,
                  num_classes=10)
    config.update(overrides)
    return LightningDiT(**config)


def randomize(model, std=0.05):
    """Non-zero weights everywhere (the zero init would make output comparisons vacuous)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=generator) * std)
    return model


#################################################################################
#                                     Model                                     #
#################################################################################

def test_output_is_zero_at_init():
    torch.manual_seed(0)
    for patch in (1, 2):
        model = tiny_model(patch_size=patch)
        x = torch.randn(3, 4, 4, 4)
        v = model(x, torch.rand(3), torch.tensor([0, 5, 10]))
        assert v.shape == x.shape
        assert torch.equal(v, torch.zeros_like(v))


def test_output_shape_and_dependence_after_randomizing():
    torch.manual_seed(0)
    model = randomize(tiny_model(patch_size=2))
    x = torch.randn(2, 4, 4, 4)
    v = model(x, torch.tensor([0.2, 0.7]), torch.tensor([1, 2]))
    assert v.shape == x.shape
    # t and y both reach the output
    assert not torch.allclose(v, model(x, torch.tensor([0.3, 0.7]), torch.tensor([1, 2])))
    assert not torch.allclose(v, model(x, torch.tensor([0.2, 0.7]), torch.tensor([3, 2])))
    with pytest.raises(ValueError, match="built for latents"):
        model(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2]))


def test_pos_embed_is_frozen_and_in_state_dict_rope_is_not():
    model = tiny_model()
    assert not model.pos_embed.requires_grad
    assert "pos_embed" in model.state_dict()
    assert not any("rope" in k for k in model.state_dict())
    assert model.config["hidden_size"] == 64 and LightningDiT(**model.config).config == model.config


def test_parameter_counts():
    # The published counts include the frozen position table.
    expected = {"LightningDiT-B/1": 130.6e6, "LightningDiT-L/1": 458.2e6, "LightningDiT-XL/1": 675.3e6}
    for name, count in expected.items():
        with torch.device("meta"):
            model = create_model(name)
        n = sum(p.numel() for p in model.parameters())
        assert abs(n - count) / count < 0.02, (name, n)
        assert abs(n - count) < 0.1e6, (name, n)   # in fact equal to the published digits
    with torch.device("meta"):
        xl = create_model("LightningDiT-XL/1")
    assert xl.blocks[0].mlp.w3.in_features == 3072
    assert len(xl.blocks) == 28 and xl.pos_embed.shape == (1, 256, 1152)


def test_create_model_errors():
    with pytest.raises(ValueError, match="unknown model"):
        create_model("LightningDiT-H/1")
    with pytest.raises(ValueError, match="unknown model"):
        create_model("DiT-XL/2")
    with pytest.raises(ValueError, match="unknown LightningDiT override"):
        create_model("LightningDiT-B/1", hiden_size=64)
    model = create_model("LightningDiT-B/2", depth=1, hidden_size=64, num_heads=2, input_size=4,
                         in_channels=4, num_classes=3, qk_norm=True)
    assert model.config["patch_size"] == 2 and model.config["qk_norm"]


def test_fullgraph_compile_matches_eager():
    torch.manual_seed(0)
    model = randomize(tiny_model(patch_size=2, qk_norm=True)).eval()
    x, t, y = torch.randn(2, 4, 4, 4), torch.rand(2), torch.tensor([1, 10])
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        expected = model(x, t, y)
        got = compiled(x, t, y)
    assert expected.abs().max() > 1e-3
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_drop_labels():
    y = torch.arange(1000) % 7
    g = torch.Generator().manual_seed(0)
    dropped = drop_labels(y, 0.1, 7, generator=g)
    null = dropped == 7
    assert 50 < null.sum() < 150
    assert torch.equal(dropped[~null], y[~null])
    assert torch.equal(drop_labels(y, 0.0, 7), y)
    assert (drop_labels(y, 1.0, 7) == 7).all()


#################################################################################
#                                    2D RoPE                                    #
#################################################################################

def rope_logits(head_dim=16, grid=6, seed=0):
    """logits[i, j] = q_i . k_j with the same q and k at every position, rotated by RoPE."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(head_dim, generator=g, dtype=torch.float64)
    k = torch.randn(head_dim, generator=g, dtype=torch.float64)
    cos, sin = (a.double() for a in rope_2d(grid, head_dim))
    T = grid * grid
    q_rot = apply_rope(q.expand(1, 1, T, head_dim), cos, sin)[0, 0]  # (T, Dh)
    k_rot = apply_rope(k.expand(1, 1, T, head_dim), cos, sin)[0, 0]
    return (q_rot @ k_rot.T).view(grid, grid, grid, grid)            # (r_q, c_q, r_k, c_k)


def test_rope_logits_depend_only_on_relative_position():
    L = rope_logits()
    grid = L.shape[0]
    for (r1, c1), (r2, c2) in [((0, 0), (2, 3)), ((1, 4), (3, 0)), ((2, 2), (0, 1))]:
        base = L[r1, c1, r2, c2]
        for dr, dc in [(1, 0), (2, 0), (0, 1), (0, 2), (1, 1)]:   # row shifts, column shifts, both
            if max(r1, r2) + dr < grid and max(c1, c2) + dc < grid:
                # tables are float32, hence the tolerance; the differences below are >1e-3
                torch.testing.assert_close(L[r1 + dr, c1 + dc, r2 + dr, c2 + dc], base, rtol=1e-6, atol=1e-6)
    # ... and does depend on the relative position, along rows and along columns
    assert (L[0, 0, 0, 1] - L[0, 0, 0, 2]).abs() > 1e-3
    assert (L[0, 0, 1, 0] - L[0, 0, 2, 0]).abs() > 1e-3
    assert (L[0, 0, 1, 0] - L[0, 0, 0, 1]).abs() > 1e-3   # row and column offsets are distinguished


def test_rope_layout_rows_first_half_columns_second():
    head_dim, grid = 16, 4
    cos, sin = rope_2d(grid, head_dim)
    assert cos.shape == sin.shape == (grid * grid, head_dim // 2)
    angles = torch.atan2(sin, cos).view(grid, grid, head_dim // 2)        # (row, col, pair)
    quarter = head_dim // 4
    # first half of the pairs: the same along a row (column changes), changes with the row
    assert torch.allclose(angles[:, :1, :quarter].expand(-1, grid, -1), angles[:, :, :quarter])
    assert not torch.allclose(angles[:1, :, :quarter], angles[1:2, :, :quarter])
    assert torch.allclose(angles[:1, :, quarter:].expand(grid, -1, -1), angles[:, :, quarter:])
    # pair 0 has frequency 1 (theta^0): angle = row index; last pair of each half: theta^(-(q-1)/q)
    torch.testing.assert_close(angles[2, 3, 0], torch.tensor(2.0))
    torch.testing.assert_close(angles[2, 3, quarter], torch.tensor(3.0))
    torch.testing.assert_close(angles[1, 1, quarter - 1], torch.tensor(10000.0 ** (-(quarter - 1) / quarter)))
    with pytest.raises(ValueError, match="divisible by 4"):
        rope_2d(4, 18)


#################################################################################
#                                 Flow matching                                 #
#################################################################################

def test_shift_time():
    t = torch.linspace(0, 1, 11)
    torch.testing.assert_close(shift_time(t, 1.0), t)
    shifted = shift_time(t, 0.3)
    assert shifted[0] == 0 and shifted[-1] == 1 and (shifted[1:-1] < t[1:-1]).all()
    torch.testing.assert_close(shift_time(torch.tensor(0.5), 0.3), torch.tensor(0.15 / 0.65))


def test_flow_loss_parts():
    torch.manual_seed(0)
    model = tiny_model()
    x, y = torch.randn(4, 4, 4, 4), torch.tensor([0, 1, 2, 3])
    loss, parts = flow_loss(model, x, y, generator=torch.Generator().manual_seed(0))
    # the zero-initialised model predicts v_hat = 0: cosine term exactly 1, MSE = mean (x - eps)^2
    torch.testing.assert_close(parts["cosine"], torch.tensor(1.0))
    torch.testing.assert_close(loss, parts["mse"] + parts["cosine"])
    loss0, parts0 = flow_loss(model, x, y, cosine_weight=0.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loss0, parts0["mse"])
    torch.testing.assert_close(parts0["mse"], parts["mse"])

    # An oracle that knows the data x and the convention x_t = t*x + (1-t)*eps recovers
    # eps from x_t and returns the target v = x - eps: the loss must vanish.
    def oracle(x_t, t, y_in):
        t = t.view(-1, 1, 1, 1).double()
        eps = (x_t.double() - t * x) / (1 - t)
        return (x - eps).float()
    x = x.double()
    loss, parts = flow_loss(oracle, x.float(), y, generator=torch.Generator().manual_seed(3))
    assert loss.abs() < 1e-5 and parts["mse"] < 1e-10, (loss, parts)


def test_tiny_model_overfits_a_few_latents():
    torch.manual_seed(0)
    model = tiny_model(input_size=4, in_channels=4, hidden_size=64, depth=2, num_heads=2)
    x = torch.randn(4, 4, 4, 4)
    y = torch.arange(4)   # one class per latent: the velocity is then a function of (x_t, t, y)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)

    def eval_loss():
        with torch.no_grad():
            g = torch.Generator().manual_seed(123)
            return sum(flow_loss(model, x.repeat(16, 1, 1, 1), y.repeat(16), generator=g)[0]
                       for _ in range(4)) / 4

    before = eval_loss()
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        loss, _ = flow_loss(model, x.repeat(8, 1, 1, 1), y.repeat(8), generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    after = eval_loss()
    print(f"flow loss {float(before):.3f} -> {float(after):.3f}")
    assert after < before / 5, (float(before), float(after))


#################################################################################
#                                   Sampling                                    #
#################################################################################

class GaussianVelocity:
    """The exact velocity for data x ~ N(mu, s^2) per channel and x_t = t*x + (1-t)*eps:

        x_t ~ N(t*mu, sigma_t^2),  sigma_t^2 = t^2 s^2 + (1-t)^2
        Cov(x - eps, x_t) = t s^2 - (1-t)
        v(x_t, t) = E[x - eps | x_t] = mu + (t s^2 - (1-t)) / sigma_t^2 * (x_t - t*mu)

    (jointly Gaussian, so the conditional mean is the linear regression). Its ODE carries
    N(0, 1) at t=0 exactly to N(mu, s^2) at t=1."""

    num_classes = 10

    def __init__(self, mu, s):
        self.mu, self.s = mu.view(1, -1, 1, 1), s.view(1, -1, 1, 1)
        self.calls = 0

    def __call__(self, x, t, y):
        self.calls += 1
        t = t.view(-1, 1, 1, 1)
        var = t ** 2 * self.s ** 2 + (1 - t) ** 2
        return self.mu + (t * self.s ** 2 - (1 - t)) / var * (x - t * self.mu)


def gaussian_errors(method, steps, shift):
    mu = torch.tensor([1.5, -0.5, 0.0, 2.0], dtype=torch.float64)
    s = torch.tensor([0.5, 2.0, 1.0, 0.1], dtype=torch.float64)
    field = GaussianVelocity(mu, s)
    noise = torch.randn(1024, 4, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # exactly standard noise per channel, so that what is left is the integration error alone
    noise = (noise - noise.mean((0, 2, 3), keepdim=True)) / noise.std((0, 2, 3), keepdim=True, unbiased=False)
    out = sample(field, noise, torch.zeros(1024, dtype=torch.long), steps=steps, method=method, shift=shift)
    assert field.calls == steps   # steps counts model evaluations, for Euler and Heun alike
    mean_err = (out.mean((0, 2, 3)) - mu).abs().max().item()
    std_err = (out.std((0, 2, 3), unbiased=False) - s).abs().max().item()
    return mean_err, std_err


@pytest.mark.parametrize("shift", [1.0, 0.3])
def test_sampler_on_gaussian_data(shift):
    steps = [4, 8, 16, 32, 64]
    euler = [gaussian_errors("euler", n, shift) for n in steps]
    heun = [gaussian_errors("heun", n, shift) for n in steps]
    # The mean follows t*mu exactly under both schemes (affine field), so its error is
    # rounding only; the std carries the discretisation error.
    assert max(e[0] for e in euler + heun) < 1e-9
    euler_std = [e[1] for e in euler]
    heun_std = [e[1] for e in heun]
    assert all(a > b for a, b in zip(euler_std, euler_std[1:])), euler_std
    assert all(a > b for a, b in zip(heun_std, heun_std[1:])), heun_std
    assert euler_std[-1] < 0.05
    # First order: halving the step about halves the error; Heun (second order) far more.
    assert 1.7 < euler_std[-2] / euler_std[-1] < 2.3
    assert heun_std[-2] / heun_std[-1] > 3.0
    # At equal model evaluations (Heun on half as many intervals), from 8 evaluations on.
    for n, e, h in zip(steps, euler_std, heun_std):
        if n >= 8:
            assert h < e / 1.5, (n, e, h)


def test_heun_step_counting():
    field = GaussianVelocity(torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64))
    noise = torch.randn(2, 4, 2, 2, dtype=torch.float64)
    for steps in (1, 2, 3, 7, 10):
        field.calls = 0
        sample(field, noise, torch.zeros(2, dtype=torch.long), steps=steps, method="heun")
        assert field.calls == steps
    with pytest.raises(ValueError, match="unknown sampling method"):
        sample(field, noise, torch.zeros(2, dtype=torch.long), method="rk4")


class LabelField:
    """A velocity that depends on x, t and the label, so guidance has visible effects.
    Records the (t, y) of every call."""

    num_classes = 10

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, y):
        self.calls.append((t.clone(), y.clone()))
        scale = torch.arange(1, x.shape[1] + 1, dtype=x.dtype).view(1, -1, 1, 1)
        return -0.5 * x + scale * (1 + t.view(-1, 1, 1, 1)) * (y.to(x.dtype).view(-1, 1, 1, 1) - 4.0)


def euler_by_hand(field, x, y, grid, guide):
    """Euler on the given grid; guide(t) -> weight used at t (1 = conditional only)."""
    null = torch.full_like(y, field.num_classes)
    for t_cur, t_next in zip(grid[:-1], grid[1:]):
        t = torch.full((x.shape[0],), t_cur, dtype=x.dtype)
        v_c, v_u = field(x, t, y), field(x, t, null)
        x = x + (t_next - t_cur) * (v_u + guide(t_cur) * (v_c - v_u))
    return x


def test_guidance():
    noise = torch.randn(3, 6, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.tensor([0, 3, 7])
    field = LabelField()

    # cfg_scale=1 is the conditional prediction alone, with no unconditional pass
    plain = sample(field, noise, y, steps=4, shift=1.0, cfg_scale=1.0)
    assert all(call_y.shape[0] == 3 and (call_y != 10).all() for _, call_y in field.calls)
    expected = euler_by_hand(LabelField(), noise, y, [0, 0.25, 0.5, 0.75, 1.0], lambda t: 1.0)
    torch.testing.assert_close(plain, expected)

    # guidance everywhere, with cond and uncond in one batched call
    field.calls = []
    guided = sample(field, noise, y, steps=4, shift=1.0, cfg_scale=3.0)
    assert len(field.calls) == 4 and all(call_y.shape[0] == 6 for _, call_y in field.calls)
    assert (field.calls[0][1][3:] == 10).all()
    expected = euler_by_hand(LabelField(), noise, y, [0, 0.25, 0.5, 0.75, 1.0], lambda t: 3.0)
    torch.testing.assert_close(guided, expected)
    assert not torch.allclose(guided, plain)

    # interval: no guidance, and no unconditional pass, where the (shifted) t < cfg_interval
    field = LabelField()
    interval = sample(field, noise, y, steps=4, shift=1.0, cfg_scale=3.0, cfg_interval=0.5)
    assert [call_y.shape[0] for _, call_y in field.calls] == [3, 3, 6, 6]
    expected = euler_by_hand(LabelField(), noise, y, [0, 0.25, 0.5, 0.75, 1.0],
                             lambda t: 3.0 if t >= 0.5 else 1.0)
    torch.testing.assert_close(interval, expected)
    never = sample(LabelField(), noise, y, steps=4, shift=0.3, cfg_scale=3.0, cfg_interval=1.01)
    torch.testing.assert_close(never, sample(LabelField(), noise, y, steps=4, shift=0.3))
    # the interval is checked on the shifted grid: shift 0.3 puts t=0.5 at 0.23 < 0.3
    shifted = sample(LabelField(), noise, y, steps=2, shift=0.3, cfg_scale=3.0, cfg_interval=0.3)
    torch.testing.assert_close(shifted, sample(LabelField(), noise, y, steps=2, shift=0.3))

    # cfg_channels=3 guides the first three channels only
    partial = sample(LabelField(), noise, y, steps=4, shift=1.0, cfg_scale=3.0, cfg_channels=3)
    assert not torch.allclose(partial[:, :3], plain[:, :3])
    torch.testing.assert_close(partial[:, 3:], plain[:, 3:])
    torch.testing.assert_close(partial[:, :3], guided[:, :3])


def test_sample_with_model_and_compiled_model():
    torch.manual_seed(0)
    model = randomize(tiny_model()).eval()
    noise, y = torch.randn(2, 4, 4, 4), torch.tensor([1, 2])
    out = sample(model, noise, y, steps=3, method="heun", cfg_scale=2.0, cfg_interval=0.1)
    assert out.shape == noise.shape and torch.isfinite(out).all()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(sample(compiled, noise, y, steps=3, method="heun", cfg_scale=2.0,
                                      cfg_interval=0.1), out, rtol=1e-4, atol=1e-5)


#################################################################################
#                               Checkpoint loading                              #
#################################################################################

def test_load_dit(tmp_path):
    torch.manual_seed(0)
    model = randomize(tiny_model(qk_norm=True))
    ema = randomize(tiny_model(qk_norm=True), std=0.02)
    path = tmp_path / "dit.pt"
    torch.save({"model_config": model.config, "model": model.state_dict(), "ema": ema.state_dict(),
                "step": 7}, path)
    x, t, y = torch.randn(2, 4, 4, 4), torch.rand(2), torch.tensor([1, 2])
    loaded, ckpt = load_dit(str(path))
    assert not loaded.training and ckpt["step"] == 7
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, y), ema(x, t, y))
        raw, _ = load_dit(str(path), use_ema=False)
        torch.testing.assert_close(raw(x, t, y), model(x, t, y))

    with pytest.raises(FileNotFoundError, match="not found"):
        load_dit(str(tmp_path / "missing.pt"))
    state = model.state_dict()
    del state["blocks.0.norm1.weight"]
    torch.save({"model_config": model.config, "model": state, "ema": state}, path)
    with pytest.raises(RuntimeError, match="blocks.0.norm1.weight"):
        load_dit(str(path))
