"""
Line charts drawn with Pillow, so that pictures need no plotting library at run time: the
curves.png of every run folder (drawn from its metrics.jsonl at each log line) and the
convergence curves of ablations.py.

    panel = dict(title="loss", xlabel="step", ylabel="loss", series=[dict(label="train", x=[...], y=[...])])
    draw_panels([panel]).save("curves.png")

The functions return PIL images; the callers write them (harness.atomic_path, the one
atomic writer, which plot.py sits below).

A series may carry `low` and `high` lists (a band, e.g. mean_interval's 95% interval of the
mean over seeds; None where there is none) and `points` (extra (x, y) dots, e.g. single
seeds). Tick labels are plain numbers, the legend sits right of the axes, outside the data.
"""
import json
import math

from PIL import Image, ImageDraw, ImageFont

COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75),
          (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
PANEL_W, PANEL_H, MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 700, 340, 78, 196, 34, 52   # legend in MARGIN_R


#################################################################################
#                                  Axes helpers                                 #
#################################################################################

def nice_ticks(low, high, count=5):
    """About `count` round tick values covering [low, high] (1, 2 or 5 times a power of 10)."""
    if not math.isfinite(low) or not math.isfinite(high):
        return [0.0]
    if high <= low:
        high = low + (abs(low) or 1.0)
    raw = (high - low) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(low / step) * step
    return [first + i * step for i in range(int(math.ceil((high - first) / step)) + 1)]


def tick_labels(ticks):
    """Plain numbers (500, 1000, 1500; 0.2, 0.4), with the decimals the tick step needs."""
    step = abs(ticks[1] - ticks[0]) if len(ticks) > 1 else abs(ticks[0]) or 1.0
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    return [f"{0.0 if abs(t) < step / 2 else t:.{decimals}f}" for t in ticks]   # no "-0.0"


def mean_interval(values, confidence=0.95):
    """(mean, low, high): the mean of `values` (e.g. one number per seed) and its Student-t
    interval mean +- t_{(1+c)/2, n-1} * sd / sqrt(n), sd with n - 1; low and high are None
    for a single value, which has no interval."""
    from scipy.stats import t    # here, not at the top: every training script imports plot.py
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None, None
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(t.ppf((1 + confidence) / 2, n - 1)) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def finite(values):
    return [v for v in values if v is not None and math.isfinite(v)]


#################################################################################
#                                    Panels                                     #
#################################################################################

def draw_panel(draw, left, top, panel, font):
    """One chart with axes, ticks, labels and a legend, in a PANEL_W x PANEL_H box."""
    series = [s for s in panel["series"] if finite(s["y"])]
    x0, y0 = left + MARGIN_L, top + MARGIN_T
    x1, y1 = left + PANEL_W - MARGIN_R, top + PANEL_H - MARGIN_B
    draw.text((left + PANEL_W / 2, top + 4), panel["title"], fill="black", font=font, anchor="mt")
    draw.rectangle((x0, y0, x1, y1), outline="black")
    if not series:
        draw.text(((x0 + x1) / 2, (y0 + y1) / 2), "no data yet", fill="gray", font=font, anchor="mm")
        return
    xs = [x for s in series for x in s["x"]]
    ys = [y for s in series for y in finite(s["y"]) + finite(s.get("low", [])) + finite(s.get("high", []))
          + [p[1] for p in s.get("points", [])]]
    x_ticks, y_ticks = nice_ticks(min(xs), max(xs)), nice_ticks(min(ys), max(ys))
    (xa, xb), (ya, yb) = (x_ticks[0], x_ticks[-1]), (y_ticks[0], y_ticks[-1])
    to_px = lambda x, y: (x0 + (x - xa) / ((xb - xa) or 1) * (x1 - x0), y1 - (y - ya) / ((yb - ya) or 1) * (y1 - y0))
    for x, label in zip(x_ticks, tick_labels(x_ticks)):
        px = to_px(x, ya)[0]
        draw.line((px, y1, px, y1 + 4), fill="black")
        draw.text((px, y1 + 6), label, fill="black", font=font, anchor="mt")
    for y, label in zip(y_ticks, tick_labels(y_ticks)):
        py = to_px(xa, y)[1]
        draw.line((x0 - 4, py, x0, py), fill="black")
        draw.line((x0 + 1, py, x1 - 1, py), fill=(230, 230, 230))
        draw.text((x0 - 6, py), label, fill="black", font=font, anchor="rm")
    draw.text(((x0 + x1) / 2, y1 + 26), panel.get("xlabel", ""), fill="black", font=font, anchor="mt")
    # The y-axis title sits above the axis, under the panel title (Pillow draws no rotated text).
    draw.text((left + 4, top + 19), panel.get("ylabel", ""), fill="black", font=font, anchor="lt")
    for i, s in enumerate(series):      # every band first, so that no band hides another series' line
        color = tuple(s.get("color", COLORS[i % len(COLORS)]))
        if "low" in s and "high" in s:
            inside = [(x, lo, hi) for x, lo, hi in zip(s["x"], s["low"], s["high"])
                      if lo is not None and hi is not None]                      # a single seed has none
            band = [to_px(x, hi) for x, _, hi in inside] + [to_px(x, lo) for x, lo, _ in reversed(inside)]
            if len(band) >= 3:
                draw.polygon(band, fill=tuple(int(c + (255 - c) * 0.75) for c in color))
    for i, s in enumerate(series):
        color = tuple(s.get("color", COLORS[i % len(COLORS)]))
        line = [to_px(x, y) for x, y in zip(s["x"], s["y"]) if y is not None and math.isfinite(y)]
        if len(line) > 1:
            draw.line(line, fill=color, width=2)
        for px, py in line if len(line) < 30 else []:
            draw.ellipse((px - 2.5, py - 2.5, px + 2.5, py + 2.5), fill=color)
        for x, y in s.get("points", []):
            px, py = to_px(x, y)
            draw.ellipse((px - 2, py - 2, px + 2, py + 2), outline=color)
    # Legend, right of the axes: it never covers a curve.
    labelled = [(i, s) for i, s in enumerate(series) if s.get("label")]
    for row, (i, s) in enumerate(labelled):
        ly = y0 + 8 + row * 16
        color = tuple(s.get("color", COLORS[i % len(COLORS)]))
        draw.line((x1 + 8, ly, x1 + 28, ly), fill=color, width=3)
        draw.text((x1 + 32, ly), s["label"], fill="black", font=font, anchor="lm")


def draw_panels(panels, columns=2):
    """The panels drawn on a grid, as a PIL image."""
    columns = min(columns, len(panels))
    rows = math.ceil(len(panels) / columns)
    image = Image.new("RGB", (columns * PANEL_W, rows * PANEL_H), "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default(size=12)
    for k, panel in enumerate(panels):
        draw_panel(draw, (k % columns) * PANEL_W, (k // columns) * PANEL_H, panel, font)
    return image


#################################################################################
#                           A run folder's curves.png                           #
#################################################################################

# metrics.jsonl name -> (panel title, y-axis title with its unit). A panel is drawn for each
# name the run logged: a stage shows the terms it trains on (stage 2 its L_sp; lambda_adapt
# and the discriminator's loss once the GAN is on; the DiT its MSE and cosine terms).
TERMS = {"loss": ("total loss (what the step minimises)", "loss (weighted sum)"),
         "l1": ("L1 reconstruction term", "mean |x_hat - x| (pixels in [-1, 1])"),
         "perceptual": ("perceptual (LPIPS) term", "LPIPS distance"),
         "sp": ("semantic preservation L_sp", "L_sp (MSE or 1 - cosine)"),
         "gan": ("generator GAN term", "hinge loss"),
         "lambda": ("adaptive GAN weight lambda_adapt", "gradient-norm ratio"),
         "d_loss": ("discriminator loss", "hinge loss"),
         "mse": ("velocity MSE", "mean (v_hat - v)^2"),
         "cosine": ("velocity cosine term", "mean 1 - cos(v_hat, v)"),
         "psnr": ("reconstruction PSNR", "PSNR (dB)"),
         "accuracy": ("stand-in classifier accuracy", "accuracy (fraction)"),
         "grad_norm": ("gradient norm (before clipping)", "L2 norm"),
         "skipped": ("skipped (non-finite) steps", "steps (cumulative count)")}


def curve_panels(records):
    """The panels of a run's curves.png from its metrics.jsonl records: one per logged term
    of TERMS that has a value somewhere, in TERMS' order, against the training step."""
    steps = [r["step"] for r in records]
    panels = []
    for name, (title, ylabel) in TERMS.items():
        values = [r.get(name, 0 if name == "skipped" else None) for r in records]
        if name == "skipped" or finite(values):
            panels.append(dict(name=name, title=title, xlabel="training step (optimiser updates)", ylabel=ylabel,
                               series=[dict(x=steps, y=values)]))
    return panels


def training_curves(metrics_path):
    """The image of a run's curves.png, drawn from its metrics.jsonl (curve_panels)."""
    with open(metrics_path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return draw_panels(curve_panels(records))
