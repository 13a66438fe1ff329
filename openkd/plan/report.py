"""What `openkd plan` and `openkd plan fit` show and write: terminal tables, plan.json,
fit.json, written atomically; a file there that openkd did not write is never replaced."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from openkd import __version__, console
from openkd.data.metadata import now
from openkd.errors import OpenkdError
from openkd.plan.fit import FitResult
from openkd.plan.plot import count_label
from openkd.plan.predict import Cell

PLAN_FORMAT = "openkd.plan/1"
FIT_FORMAT = "openkd.plan.fit/1"


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` in one step (a crash leaves the old file or none)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_replaceable(path: Path, fmt: str, flag: str) -> None:
    """`path` may be written: absent, or a JSON file of format `fmt` openkd wrote before."""
    if not path.exists():
        return
    if path.is_dir():
        raise OpenkdError(f"{flag} {path} is a directory; pass a file path")
    try:
        ours = json.loads(path.read_text(encoding="utf-8")).get("format") == fmt
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        ours = False
    if not ours:
        raise OpenkdError(f"{path} exists and openkd plan did not write it; choose another {flag}")


def dump(data: dict[str, Any]) -> bytes:
    """JSON with every non-finite number as null (JSON has no NaN or Infinity)."""
    return (json.dumps(_finite(data), indent=2, allow_nan=False) + "\n").encode()


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def header(fmt: str) -> dict[str, Any]:
    return {"format": fmt, "created_at": now(), "openkd": __version__}


def _bytes(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def _fmt(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}g}"


# --- fit --------------------------------------------------------------------------------


def fit_table(kind: str, result: FitResult) -> None:
    from rich.table import Table

    spread = result.uncertainty()
    table = Table(title=f"openkd plan fit: {kind} law", title_justify="left")
    for column in ("coefficient", "value", "90 % interval", "note"):
        table.add_column(column, justify="left" if column in ("coefficient", "note") else "right")
    for name, value in result.coefficients.items():
        band = spread.get(name)
        interval = f"{band['low']:.4g} - {band['high']:.4g}" if band else "-"
        table.add_row(name, f"{value:.4g}", interval, result.fixed.get(name, ""))
    console.console.print(table)
    errors = [abs(r["relative_error"]) for r in result.residuals]
    if errors:
        console.info(
            f"{kind}: {len(errors)} pilots, relative error of the fit mean {100 * sum(errors) / len(errors):.2f} %, "
            f"max {100 * max(errors):.2f} %; {len(result.samples)} of {result.resamples} "
            "bootstrap resamples identified the law"
        )


# --- plan ---------------------------------------------------------------------------------


def grid_table(
    cells: Sequence[Cell], sizes: Sequence[float], budgets: Sequence[float], best: Cell | None
) -> None:
    """Predicted L_S (and the SFT baseline) for every candidate: rows sizes, columns budgets."""
    from rich.table import Table

    by = {(c.n, c.d): c for c in cells}
    table = Table(
        title="openkd plan: predicted L_S (SFT baseline); * recommended, ~ outside the fit, "
        "() over budget",
        title_justify="left",
    )
    table.add_column("N_S \\ D_S", style="bold")
    for d in budgets:
        table.add_column(count_label(d), justify="right")
    for n in sizes:
        row = [count_label(n)]
        for d in budgets:
            c = by[(n, d)]
            text = _fmt(c.loss, 4)
            if c.supervised is not None:
                text += f" ({_fmt(c.supervised, 4)})"
            if c.extrapolation:
                text = "~" + text
            if c is best:
                text = "*" + text
            if not c.within_budget:
                text = f"[dim]({text})[/]"
            row.append(text)
        table.add_row(*row)
    console.console.print(table)


def recommendation_rows(rec: dict[str, Any] | None) -> list[tuple[str, str]]:
    if rec is None:
        return [("recommendation", "none: no candidate fits the budget")]
    costs = rec["costs"]
    rows = [
        ("student size N_S", count_label(rec["N_S"])),
        ("token budget D_S", count_label(rec["D_S"])),
        (
            "predicted L_S",
            _fmt(rec["L_S"], 4)
            + (
                f" (90 %: {rec['L_S_interval_90'][0]:.4g} - {rec['L_S_interval_90'][1]:.4g})"
                if rec.get("L_S_interval_90")
                else ""
            ),
        ),
        ("SFT baseline L~_S", _fmt(rec["L_supervised"], 4)),
        (
            "distillation beats SFT",
            {True: "yes", False: "no", None: "unknown (no supervised law)"}[
                rec["distillation_beats_sft"]
            ],
        ),
        ("teacher tokens to label", count_label(costs["teacher_tokens"])),
        (
            "labelling",
            f"{costs['teacher_flops']:.3g} FLOPs, {costs['labelling_gpu_hours']:.3g} GPU-h"
            if costs["teacher_flops"] or costs["labelling_gpu_hours"]
            else "not costed (no N_T or --meta)",
        ),
        (
            "student training",
            f"{costs['student_flops']:.3g} FLOPs, {costs['student_gpu_hours']:.3g} GPU-h",
        ),
        ("total", f"{costs['total_flops']:.3g} FLOPs, {costs['total_gpu_hours']:.3g} GPU-h"),
    ]
    if costs.get("sidecar_bytes") is not None:
        rows.append(("--logprobs sidecar", _bytes(costs["sidecar_bytes"])))
    gap = rec.get("capacity_gap")
    if gap is None:
        rows.append(("capacity gap", "not known: these coefficients fix c0 (one teacher)"))
    elif gap["past_sweet_spot"]:
        rows.append(
            (
                "capacity gap",
                f"PAST the sweet spot: a teacher of L_T {gap['best_teacher_loss']:.3g} would give L_S {gap['L_S_with_best_teacher']:.4g}",
            )
        )
    else:
        rows.append(
            (
                "capacity gap",
                f"no: a stronger teacher (down to L_T {gap['best_teacher_loss']:.3g}) would still help",
            )
        )
    return rows
