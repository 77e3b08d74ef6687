"""Training curves from WORKDIR/metrics.jsonl to a PNG: loss + validation loss, and mIoU.

    python scripts/plot_metrics.py WORKDIR [--out WORKDIR/metrics.png]

Each line of metrics.jsonl is one JSON object with a `step` and any of the plotted keys (training,
validation and evaluation write different lines). Draws with matplotlib when it is installed, else
with PIL alone (matplotlib is not a dependency).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys

from PIL import Image, ImageDraw, ImageFont

# Panel title -> curves, each (label, keys accepted for it in metrics.jsonl, colour).
PANELS: dict[str, list[tuple[str, tuple[str, ...], tuple[int, int, int]]]] = {
    "loss": [
        ("train loss", ("loss", "train_loss", "train/loss"), (31, 119, 180)),
        ("val loss", ("val_loss", "val/loss", "validation_loss"), (255, 127, 14)),
    ],
    "mIoU": [
        ("mIoU", ("miou", "eval_miou", "eval/miou"), (44, 160, 44)),
        ("valid rate", ("valid_rate", "eval_valid_rate", "eval/valid_rate"), (148, 103, 189)),
    ],
}
Series = dict[str, list[tuple[float, float]]]


def read_series(path: pathlib.Path) -> dict[str, Series]:
    """Panel -> curve label -> [(step, value)] from metrics.jsonl (bad lines are skipped)."""
    panels: dict[str, Series] = {panel: {} for panel in PANELS}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict) or "step" not in record:
            continue
        for panel, curves in PANELS.items():
            for label, keys, _ in curves:
                value = next((record[key] for key in keys if key in record), None)
                if isinstance(value, int | float) and math.isfinite(value):
                    panels[panel].setdefault(label, []).append(
                        (float(record["step"]), float(value))
                    )
    return {panel: series for panel, series in panels.items() if series}


def _colour(panel: str, label: str) -> tuple[int, int, int]:
    return next(colour for name, _, colour in PANELS[panel] if name == label)


def _draw_panel(draw, box, panel: str, series: Series, font) -> None:
    left, top, right, bottom = box
    plot = (left + 60, top + 24, right - 16, bottom - 30)
    draw.text((left + 60, top + 4), panel, fill=(0, 0, 0), font=font)
    points = [p for curve in series.values() for p in curve]
    x_lo, x_hi = min(p[0] for p in points), max(p[0] for p in points)
    y_lo, y_hi = min(p[1] for p in points), max(p[1] for p in points)
    x_hi, y_hi = (x_hi if x_hi > x_lo else x_lo + 1), (y_hi if y_hi > y_lo else y_lo + 1e-6)

    def to_pixel(x: float, y: float) -> tuple[float, float]:
        px = plot[0] + (x - x_lo) / (x_hi - x_lo) * (plot[2] - plot[0])
        py = plot[3] - (y - y_lo) / (y_hi - y_lo) * (plot[3] - plot[1])
        return px, py

    for fraction in (0.0, 0.5, 1.0):
        y = y_lo + fraction * (y_hi - y_lo)
        _, py = to_pixel(x_lo, y)
        draw.line((plot[0], py, plot[2], py), fill=(225, 225, 225))
        draw.text((left + 4, py - 6), f"{y:.4g}", fill=(0, 0, 0), font=font)
        x = x_lo + fraction * (x_hi - x_lo)
        px, _ = to_pixel(x, y_lo)
        draw.text((px - 10, plot[3] + 4), f"{x:.0f}", fill=(0, 0, 0), font=font)
    draw.text(((plot[0] + plot[2]) // 2 - 10, plot[3] + 16), "step", fill=(0, 0, 0), font=font)
    draw.rectangle(plot, outline=(0, 0, 0))
    for index, (label, curve) in enumerate(series.items()):
        colour = _colour(panel, label)
        pixels = [to_pixel(x, y) for x, y in sorted(curve)]
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=2)
        for px, py in pixels if len(pixels) <= 50 else pixels[-1:]:
            draw.ellipse((px - 2, py - 2, px + 2, py + 2), fill=colour)
        draw.text((plot[0] + 90 + 110 * index, top + 4), label, fill=colour, font=font)


def plot_pil(panels: dict[str, Series], out: pathlib.Path, width: int = 720) -> None:
    height_per_panel = 260
    image = Image.new("RGB", (width, height_per_panel * len(panels)), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    for index, (panel, series) in enumerate(panels.items()):
        top = index * height_per_panel
        _draw_panel(draw, (0, top, width, top + height_per_panel), panel, series, font)
    image.save(out)


def plot_matplotlib(panels: dict[str, Series], out: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(panels), 1, figsize=(8, 3 * len(panels)), squeeze=False)
    for axis, (panel, series) in zip(axes[:, 0], panels.items(), strict=True):
        for label, curve in series.items():
            xs, ys = zip(*sorted(curve), strict=True)
            colour = tuple(c / 255 for c in _colour(panel, label))
            axis.plot(xs, ys, label=label, color=colour, marker="." if len(xs) <= 50 else None)
        axis.set_title(panel)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=pathlib.Path, help="directory holding metrics.jsonl")
    parser.add_argument("--out", type=pathlib.Path, help="PNG path (default WORKDIR/metrics.png)")
    parser.add_argument("--pil", action="store_true", help="draw with PIL even with matplotlib")
    args = parser.parse_args(argv)
    source = args.workdir / "metrics.jsonl"
    if not source.is_file():
        print(f"error: {source} not found; train first (it is written every log_steps).")
        return 1
    panels = read_series(source)
    if not panels:
        print(f"error: {source} has no loss, val loss or mIoU values to plot.")
        return 1
    out = args.out or args.workdir / "metrics.png"
    try:
        if args.pil:
            raise ImportError
        plot_matplotlib(panels, out)
    except ImportError:
        plot_pil(panels, out)
    print(f"wrote {out} ({', '.join(f'{p}: {len(s)} curves' for p, s in panels.items())})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
