"""
Line charts drawn with Pillow, so that pictures need no plotting library at run time: the
curves.png of every run folder (drawn from its metrics.jsonl at each log line) and the
convergence curves of ablations.py.

    panel = dict(title="loss", xlabel="step", ylabel="loss", series=[dict(label="train", x=[...], y=[...])])
    draw_panels([panel]).save("curves.png")

The functions return PIL images; the callers write them (training.atomic_path, the one
atomic writer, which plot.py sits below).

A series may carry `low` and `high` lists (a band, e.g. the spread over seeds) and `points`
(extra (x, y) dots, e.g. single seeds).
"""
import json
import math

from PIL import Image, ImageDraw, ImageFont

COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75),
          (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
PANEL_W, PANEL_H, MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 520, 340, 78, 16, 34, 52


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


def tick_label(value):
    if value == 0:
        return "0"
    if abs(value) >= 1e4 or abs(value) < 1e-2:
        return f"{value:.1e}"
    return f"{value:.3g}"


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
    draw.text((left + PANEL_W / 2, top + 8), panel["title"], fill="black", font=font, anchor="mt")
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
    for x in x_ticks:
        px = to_px(x, ya)[0]
        draw.line((px, y1, px, y1 + 4), fill="black")
        draw.text((px, y1 + 6), tick_label(x), fill="black", font=font, anchor="mt")
    for y in y_ticks:
        py = to_px(xa, y)[1]
        draw.line((x0 - 4, py, x0, py), fill="black")
        draw.line((x0 + 1, py, x1 - 1, py), fill=(230, 230, 230))
        draw.text((x0 - 6, py), tick_label(y), fill="black", font=font, anchor="rm")
    draw.text(((x0 + x1) / 2, y1 + 26), panel.get("xlabel", ""), fill="black", font=font, anchor="mt")
    draw.text((left + 4, top + 8), panel.get("ylabel", ""), fill="black", font=font, anchor="lt")
    for i, s in enumerate(series):
        color = tuple(s.get("color", COLORS[i % len(COLORS)]))
        if "low" in s and "high" in s:
            band = [to_px(x, y) for x, y in zip(s["x"], s["high"])] + \
                   [to_px(x, y) for x, y in reversed(list(zip(s["x"], s["low"])))]
            if len(band) >= 3:
                draw.polygon(band, fill=tuple(int(c + (255 - c) * 0.75) for c in color))
        line = [to_px(x, y) for x, y in zip(s["x"], s["y"]) if y is not None and math.isfinite(y)]
        if len(line) > 1:
            draw.line(line, fill=color, width=2)
        for px, py in line if len(line) < 30 else []:
            draw.ellipse((px - 2.5, py - 2.5, px + 2.5, py + 2.5), fill=color)
        for x, y in s.get("points", []):
            px, py = to_px(x, y)
            draw.ellipse((px - 2, py - 2, px + 2, py + 2), outline=color)
    # Legend, top right inside the axes.
    labelled = [(i, s) for i, s in enumerate(series) if s.get("label")]
    for row, (i, s) in enumerate(labelled):
        ly = y0 + 8 + row * 16
        color = tuple(s.get("color", COLORS[i % len(COLORS)]))
        draw.line((x1 - 150, ly, x1 - 130, ly), fill=color, width=3)
        draw.text((x1 - 126, ly), s["label"], fill="black", font=font, anchor="lm")


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

def training_curves(metrics_path):
    """The image of a run's curves.png: loss, reconstruction PSNR (or stage 0's accuracy), gradient
    norm and skipped steps against the step, from the run's metrics.jsonl."""
    with open(metrics_path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    steps = [r["step"] for r in records]
    column = lambda name: [r.get(name) for r in records]
    quality = "psnr" if any(r.get("psnr") is not None for r in records) else "accuracy"
    panels = [dict(title="loss", xlabel="step", ylabel="loss", series=[dict(label="loss", x=steps, y=column("loss"))])]
    if any(r.get(quality) is not None for r in records):
        panels.append(dict(title=quality, xlabel="step", ylabel="dB" if quality == "psnr" else "accuracy",
                           series=[dict(label=quality, x=steps, y=column(quality))]))
    panels.append(dict(title="gradient norm", xlabel="step", ylabel="norm",
                       series=[dict(label="grad_norm", x=steps, y=column("grad_norm"))]))
    panels.append(dict(title="skipped (non-finite) steps", xlabel="step", ylabel="count",
                       series=[dict(label="skipped", x=steps, y=[r.get("skipped", 0) for r in records])]))
    return draw_panels(panels)
