"""The training curves: loss, and the divergence to the teacher, against step, as a PNG.

Drawn from the Trainer's log history at the end of training, beside the student, and linked
from its card. A picture is a nicety: a missing matplotlib or a failed drawing is one warning
line, never a failed training run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from openkd import console

CURVES_FILE = "training_curves.png"
# (log key, legend label): the loss panel, then the divergence panel (soft, mix, on-policy).
LOSS_SERIES = (("loss", "train loss"), ("eval_loss", "eval loss"))
DIVERGENCE_SERIES = (
    ("kl", "KL(teacher || student)"),
    ("eval_kl", "eval KL(teacher || student)"),
    ("reverse_kl", "reverse KL(student || teacher)"),
    ("eval_reverse_kl", "eval reverse KL(student || teacher)"),
)
DIVERGENCE_TITLE = "divergence to the teacher (nats/token)"

Series = dict[str, list[tuple[int, float]]]


def series(history: list[dict[str, Any]], keys: tuple[tuple[str, str], ...]) -> Series:
    """`{label: [(step, value), ...]}` for each key logged at least once (numbers only)."""
    out: Series = {}
    for key, label in keys:
        points = [
            (int(entry["step"]), float(entry[key]))
            for entry in history
            if isinstance(entry.get(key), int | float)
            and not isinstance(entry.get(key), bool)
            and isinstance(entry.get("step"), int)
        ]
        if points:
            out[label] = points
    return out


def write_curves(history: list[dict[str, Any]], out_dir: Path) -> Path | None:
    """Draw `history`'s curves to `out_dir/training_curves.png`; its path, or None (warned)."""
    loss = series(history, LOSS_SERIES)
    divergence = series(history, DIVERGENCE_SERIES)
    if not loss and not divergence:
        return None  # nothing was logged (fewer steps than --logging-steps)
    try:
        panels = [(p, t) for p, t in ((loss, "loss"), (divergence, DIVERGENCE_TITLE)) if p]
        return _draw(panels, out_dir / CURVES_FILE)
    except ImportError:
        console.warn(
            f"{CURVES_FILE} not drawn: matplotlib is not installed (`pip install matplotlib`); "
            "the student is saved as usual"
        )
    except Exception as exc:  # a picture must never fail a finished training run
        console.warn(f"{CURVES_FILE} not drawn ({type(exc).__name__}: {exc}); the student is saved")
    return None


def _draw(panels: list[tuple[Series, str]], path: Path) -> Path:
    # Figure without pyplot: no GUI backend, no global state; PNG goes through Agg.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5 * len(panels), 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    for i, (panel, title) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for label, points in panel.items():
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, marker="." if len(points) < 30 else None, label=label)
        ax.set_xlabel("optimizer step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    tmp = path.with_name(path.name + ".tmp")
    try:
        fig.savefig(tmp, format="png", dpi=110)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)  # a failed drawing leaves nothing behind
    return path
