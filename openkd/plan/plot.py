"""plan.png: predicted L_S against student size, one curve per token budget, with the
supervised (SFT) baseline dashed beside each, the candidates marked, the recommended one
ringed, and the sizes outside the fitted range shaded."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from openkd.plan.law import student_loss, supervised_loss
from openkd.plan.png import BLACK, Canvas, Color, text_width
from openkd.plan.predict import Cell, Coefficients

WIDTH, HEIGHT = 960, 600
LEFT, RIGHT, TOP, BOTTOM = 90, 220, 60, 80
PALETTE: list[Color] = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (23, 190, 207),
]
GRID: Color = (225, 225, 225)
SHADE: Color = (243, 243, 243)
GREY: Color = (110, 110, 110)


def count_label(value: float) -> str:
    """1500000 -> 1.5M: short enough for an axis."""
    for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def _nice_ticks(low: float, high: float, count: int = 6) -> list[float]:
    span = high - low
    step = 10 ** math.floor(math.log10(span / count)) if span > 0 else 1.0
    for mult in (1, 2, 2.5, 5, 10):
        if span / (step * mult) <= count:
            step *= mult
            break
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step) + 1)]


def draw(
    coef: Coefficients,
    teacher_loss: float,
    sizes: Sequence[float],
    budgets: Sequence[float],
    cells: Sequence[Cell],
    best: Cell | None,
) -> bytes:
    """The chart as PNG bytes."""
    canvas = Canvas(WIDTH, HEIGHT)
    x_lo, x_hi = min(sizes), max(sizes)
    if x_hi <= x_lo * 1.01:
        x_lo, x_hi = x_lo / 2, x_hi * 2
    grid_n = np.exp(np.linspace(math.log(x_lo), math.log(x_hi), 160))
    curves = []
    for i, d in enumerate(budgets):
        color = PALETTE[i % len(PALETTE)]
        ls = student_loss(coef.law, grid_n, d, teacher_loss)
        sup = None
        if coef.law.supervised is not None:
            sup = supervised_loss(coef.law.supervised, grid_n, d)
        curves.append((d, color, ls, sup))
    values = [v for _, _, ls, sup in curves for arr in (ls, sup) if arr is not None for v in arr]
    values += [c.loss for c in cells]
    finite = [v for v in values if math.isfinite(v)]
    y_lo, y_hi = min(finite), max(finite)
    pad = 0.05 * (y_hi - y_lo or abs(y_hi) or 1.0)
    y_lo, y_hi = y_lo - pad, y_hi + pad
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def px(n: float) -> float:
        return LEFT + (math.log(n) - math.log(x_lo)) / (math.log(x_hi) - math.log(x_lo)) * plot_w

    def py(v: float) -> float:
        return TOP + (y_hi - v) / (y_hi - y_lo) * plot_h

    fitted = coef.range.get("N_S")
    if fitted and fitted[0] is not None and fitted[1] is not None:
        for lo_x, hi_x in ((x_lo, min(fitted[0], x_hi)), (max(fitted[1], x_lo), x_hi)):
            if hi_x > lo_x:
                canvas.rect(round(px(lo_x)), TOP, round(px(hi_x)), TOP + plot_h, SHADE)
    for v in _nice_ticks(y_lo, y_hi):
        y = round(py(v))
        canvas.line(LEFT, y, LEFT + plot_w, y, GRID)
        label = f"{v:.3g}"
        canvas.text(LEFT - 8 - text_width(label, 1), y - 3, label, GREY)
    for k in range(math.floor(math.log10(x_lo)), math.ceil(math.log10(x_hi)) + 1):
        for m in (1, 2, 5):
            n = m * 10.0**k
            if x_lo <= n <= x_hi:
                x = round(px(n))
                canvas.line(x, TOP, x, TOP + plot_h, GRID)
                label = count_label(n)
                canvas.text(x - text_width(label) // 2, TOP + plot_h + 8, label, GREY)
    canvas.line(LEFT, TOP + plot_h, LEFT + plot_w, TOP + plot_h, BLACK)
    canvas.line(LEFT, TOP, LEFT, TOP + plot_h, BLACK)

    for _d, color, ls, sup in curves:
        for arr, dash in ((sup, 6), (ls, 0)):
            if arr is None:
                continue
            pts = [(px(n), py(v)) for n, v in zip(grid_n, arr, strict=True) if y_lo <= v <= y_hi]
            canvas.polyline(pts, color, width=2, dash=dash)
    for cell in cells:
        if not (y_lo <= cell.loss <= y_hi):
            continue
        color = PALETTE[list(budgets).index(cell.d) % len(PALETTE)]
        x, y = round(px(cell.n)), round(py(cell.loss))
        if cell.within_budget:
            canvas.rect(x - 3, y - 3, x + 3, y + 3, color)
        else:  # over budget: hollow
            canvas.line(x - 3, y - 3, x + 3, y - 3, color)
            canvas.line(x - 3, y + 3, x + 3, y + 3, color)
            canvas.line(x - 3, y - 3, x - 3, y + 3, color)
            canvas.line(x + 3, y - 3, x + 3, y + 3, color)
    if best is not None:
        x, y = round(px(best.n)), round(py(best.loss))
        for r in (7, 8):
            for t in range(0, 360, 3):
                canvas.set(
                    round(x + r * math.cos(math.radians(t))),
                    round(y + r * math.sin(math.radians(t))),
                    BLACK,
                )

    title = f"predicted student cross-entropy, teacher L_T = {teacher_loss:.3g}"
    canvas.text(LEFT, 18, title, BLACK, scale=2)
    canvas.text(LEFT, TOP - 14, "L_S (nats/token)", GREY)
    x_label = "student size N_S (non-embedding parameters)"
    canvas.text(LEFT + (plot_w - text_width(x_label)) // 2, HEIGHT - 30, x_label, GREY)

    lx, ly = WIDTH - RIGHT + 20, TOP
    canvas.text(lx, ly, "token budget D_S", BLACK)
    ly += 18
    for d, color, _ls, _sup in curves:
        canvas.line(lx, ly + 3, lx + 24, ly + 3, color, width=2)
        canvas.text(lx + 32, ly, count_label(d), BLACK)
        ly += 16
    ly += 8
    if coef.law.supervised is not None:
        canvas.line(lx, ly + 3, lx + 24, ly + 3, GREY, width=2, dash=6)
        canvas.text(lx + 32, ly, "SFT baseline", BLACK)
        ly += 16
    canvas.rect(lx + 9, ly, lx + 15, ly + 6, GREY)
    canvas.text(lx + 32, ly, "within budget", BLACK)
    ly += 16
    for t in range(0, 360, 6):
        canvas.set(
            round(lx + 12 + 7 * math.cos(math.radians(t))),
            round(ly + 3 + 7 * math.sin(math.radians(t))),
            BLACK,
        )
    canvas.text(lx + 32, ly, "recommended", BLACK)
    ly += 16
    if fitted:
        canvas.rect(lx + 6, ly - 2, lx + 18, ly + 8, SHADE)
        canvas.text(lx + 32, ly, "outside the fit", BLACK)
    return canvas.png()
