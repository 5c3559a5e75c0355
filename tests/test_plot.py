"""plot.py: ticks, the data-to-pixel mapping (a point lands where its value says), bands,
and a run folder's curves.png drawn from its metrics.jsonl."""
import json

import numpy as np
from PIL import Image

import plot


def test_nice_ticks_cover_the_range_with_round_steps():
    assert plot.nice_ticks(0, 0.87) == [0, 0.2, 0.4, 0.6000000000000001, 0.8, 1.0]
    ticks = plot.nice_ticks(16.2, 17.3)
    assert ticks[0] <= 16.2 and ticks[-1] >= 17.3 and len(ticks) <= 7
    assert plot.nice_ticks(3, 3)[0] <= 3 <= plot.nice_ticks(3, 3)[-1]


def test_tick_labels_are_plain_numbers():
    assert plot.tick_labels(plot.nice_ticks(0, 3000)) == ["0", "1000", "2000", "3000"]
    assert plot.tick_labels(plot.nice_ticks(0, 1800)) == ["0", "500", "1000", "1500", "2000"]
    assert plot.tick_labels(plot.nice_ticks(0, 25000)) == ["0", "5000", "10000", "15000", "20000", "25000"]
    assert plot.tick_labels(plot.nice_ticks(0, 0.87)) == ["0.0", "0.2", "0.4", "0.6", "0.8", "1.0"]
    assert plot.tick_labels(plot.nice_ticks(-0.3, 0.3)) == ["-0.4", "-0.2", "0.0", "0.2", "0.4"]       # no "-0.0"
    assert plot.tick_labels(plot.nice_ticks(0, 4e-4)) == ["0.0000", "0.0001", "0.0002", "0.0003", "0.0004"]


def test_band_is_the_t_interval_of_the_mean():
    # three seeds 1, 2, 4: mean 7/3, sd sqrt(7/3), t_{0.975, 2} = 4.302652729911275
    mean, low, high = plot.mean_interval([1.0, 2.0, 4.0])
    half = 4.302652729911275 * (7 / 3) ** 0.5 / 3 ** 0.5
    assert abs(mean - 7 / 3) < 1e-12 and abs(low - (7 / 3 - half)) < 1e-9 and abs(high - (7 / 3 + half)) < 1e-9
    assert plot.mean_interval([5.0]) == (5.0, None, None)               # one seed: no band
    mean, low, high = plot.mean_interval([0.0, 1.0])                     # t_{0.975, 1} = 12.706
    assert abs(high - (0.5 + 12.706204736174707 * 0.5 ** 0.5 / 2 ** 0.5)) < 1e-9


def test_points_land_where_their_values_say(tmp_path):
    # y = 0 on the left half, y = 1 on the right: the low half must be drawn near the bottom
    # of the axes, the high half near the top, in the series colour.
    red = (214, 39, 40)
    panel = dict(title="t", xlabel="x", ylabel="y",
                 series=[dict(label="s", x=[0, 5, 5.001, 10], y=[0, 0, 1, 1], color=red,
                              low=[-0.1, -0.1, 0.9, 0.9], high=[0.1, 0.1, 1.1, 1.1])])
    path = tmp_path / "p.png"
    plot.draw_panels([panel]).save(path)
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    is_red = (np.abs(pixels - red).sum(-1) < 30)
    ys, xs = np.nonzero(is_red)
    middle = (plot.MARGIN_L + plot.PANEL_W - plot.MARGIN_R) / 2
    left, right = ys[xs < middle - 20], ys[xs > middle + 20]
    assert left.size and right.size and left.mean() > right.mean() + 100     # y grows upwards
    band = (np.abs(pixels - (245, 201, 201)).sum(-1) < 30)                     # the light band colour
    assert band.sum() > 100


def test_run_curves_from_metrics(tmp_path):
    records = [dict(step=s, loss=1 / s, psnr=10 + s, grad_norm=0.5, skipped=int(s > 2)) for s in (1, 2, 3, 4)]
    records[2]["loss"] = None                                                  # a skipped window
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    plot.training_curves(str(tmp_path / "metrics.jsonl")).save(tmp_path / "curves.png")
    with Image.open(tmp_path / "curves.png") as image:
        assert image.size == (2 * plot.PANEL_W, 2 * plot.PANEL_H)            # loss, psnr, grad norm, skipped
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "metrics.jsonl"]


def test_stage_curves_show_the_terms_that_stage_trains_on():
    """Stage 2 logs L_sp as "sp"; lambda_adapt ("lambda"), the generator's and the
    discriminator's GAN losses appear once the GAN is on (here from step 3)."""
    stage1 = [dict(step=s, loss=1.0, l1=0.5, perceptual=0.5, psnr=20.0, grad_norm=1.0, skipped=0) for s in (1, 2)]
    assert [p["name"] for p in plot.curve_panels(stage1)] == ["loss", "l1", "perceptual", "psnr", "grad_norm",
                                                             "skipped"]
    stage2 = [dict(step=s, loss=1.0, l1=0.5, sp=0.1, psnr=20.0, grad_norm=1.0, skipped=0, gan=None, d_loss=None,
                   **{"lambda": None}) for s in (1, 2)]
    stage2 += [dict(step=3, loss=1.0, l1=0.5, sp=0.1, psnr=20.0, grad_norm=1.0, skipped=0, gan=0.9, d_loss=1.9,
                    **{"lambda": 0.3})]
    panels = {p["name"]: p for p in plot.curve_panels(stage2)}
    assert list(panels) == ["loss", "l1", "sp", "gan", "lambda", "d_loss", "psnr", "grad_norm", "skipped"]
    assert panels["sp"]["series"][0]["y"] == [0.1, 0.1, 0.1] and panels["lambda"]["series"][0]["y"] == [None, None, 0.3]
    assert "dB" in panels["psnr"]["ylabel"] and "L_sp" in panels["sp"]["title"]
    assert [p["name"] for p in plot.curve_panels(stage2[:2])] == ["loss", "l1", "sp", "psnr", "grad_norm", "skipped"]


def test_legend_sits_outside_the_axes(tmp_path):
    red = (214, 39, 40)
    # a single seed's point has no interval (None): the band is drawn where there is one
    panel = dict(title="t", xlabel="x", ylabel="y", series=[dict(label="a label", x=[0, 5, 10], y=[0, 1, 1], color=red,
                                                                 low=[None, 0.9, 0.9], high=[None, 1.1, 1.1])])
    pixels = np.asarray(plot.draw_panels([panel])).astype(int)
    ys, xs = np.nonzero(np.abs(pixels - red).sum(-1) < 30)
    axes_right = plot.PANEL_W - plot.MARGIN_R
    assert (xs > axes_right + 4).sum() > 20                              # the legend's swatch, right of the axes
    assert (ys[xs > axes_right + 4] < plot.MARGIN_T + 20).all()


def test_save_grid_draws_torchvisions_grid(tmp_path):
    """harness.save_grid against torchvision's save_image (same padding, rounding and row
    filling), with a last row that is not full."""
    import torch
    from torchvision.utils import save_image

    from harness import save_grid
    images = torch.rand(7, 3, 5, 6, generator=torch.Generator().manual_seed(0)) * 2.4 - 1.2   # some outside [-1, 1]
    save_grid(images, tmp_path / "ours.png", nrow=3)
    save_image((images.clamp(-1, 1) + 1) / 2, tmp_path / "torchvision.png", nrow=3, padding=2)
    ours, reference = (np.asarray(Image.open(tmp_path / name)) for name in ("ours.png", "torchvision.png"))
    assert ours.shape == reference.shape == (2 + 3 * 7, 2 + 3 * 8, 3)
    np.testing.assert_array_equal(ours, reference)


def test_scripts_start_without_torchvision():
    """torchvision costs each script 1.4 s of start-up (7 processes in the demo); only an
    ImageFolder run needs it, and imports it there."""
    import os
    import subprocess
    import sys
    code = ("import sys, train_tokenizer, train_diffusion, sample, evaluate; "
            "print(sorted(m for m in sys.modules if m.startswith('torchvision')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout
    assert out.strip() == "[]"
