"""Predictions over a grid of student sizes x token budgets, and the recommendation.

Each cell: predicted L_S with a 90 % interval from the fit's bootstrap samples, the supervised
baseline L~_S where a supervised law is known, costs, whether it fits the budget, and whether
it lies outside the range the coefficients were fitted on. The recommendation is the cell of
lowest predicted L_S within the budget; at it, the capacity gap is checked: if a weaker
teacher would give a lower L_S (dL_S/dL_T < 0) the teacher is past the student's sweet spot.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from openkd.errors import OpenkdError
from openkd.plan import prior
from openkd.plan.costs import Costs
from openkd.plan.law import (
    DISTILLATION_NAMES,
    SUPERVISED_NAMES,
    Distillation,
    Law,
    Supervised,
    student_loss,
    supervised_loss,
    teacher_slope,
)

FIT_FORMAT = "openkd.plan.fit/1"
FAR = 4.0  # beyond this factor outside the fitted range a prediction is a guess


@dataclass
class Coefficients:
    """A law to predict with, where it came from, and where it was fitted."""

    law: Law
    source: str
    range: dict[str, list[float | None] | None]
    samples: list[Law] = field(default_factory=list)
    fixed: dict[str, str] = field(default_factory=dict)
    tokens_per_answer_token: float | None = None

    @property
    def gap_known(self) -> bool:
        """Whether the law says anything about a stronger or weaker teacher."""
        d = self.law.distillation
        return d.c0 != 0 or (d.c1 != 0 and self.law.supervised is not None)


def from_prior() -> Coefficients:
    return Coefficients(law=prior.LAW, source=f"prior: {prior.SOURCE}", range=dict(prior.RANGE))


def _law_of(
    coefficients: dict[str, float], names: tuple[str, ...], what: str, path: Path
) -> dict[str, float]:
    missing = [n for n in names if not isinstance(coefficients.get(n), int | float)]
    if missing:
        raise OpenkdError(
            f"--fit {path}: {what} coefficient {missing[0]!r} is missing; refit with openkd plan fit"
        )
    return {n: float(coefficients[n]) for n in names}


def load_fit(path: Path) -> Coefficients:
    """A fit.json that `openkd plan fit` wrote."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise OpenkdError(
            f"--fit {path} is unreadable ({err}); pass the fit.json openkd plan fit wrote"
        ) from err
    if not isinstance(data, dict) or data.get("format") != FIT_FORMAT:
        raise OpenkdError(
            f"--fit {path} is not an openkd plan fit ({FIT_FORMAT}); pass the fit.json openkd plan fit wrote"
        )
    dist = data.get("distillation") or {}
    d_coef = _law_of(dist.get("coefficients") or {}, DISTILLATION_NAMES, "distillation", path)
    sup_block = data.get("supervised")
    s_coef = None
    if sup_block:
        s_coef = _law_of(sup_block.get("coefficients") or {}, SUPERVISED_NAMES, "supervised", path)
    supervised = Supervised(**s_coef) if s_coef else None
    law = Law(Distillation(**d_coef), supervised)
    samples = []
    d_free = dist.get("free") or []
    d_samples = (dist.get("bootstrap") or {}).get("samples") or []
    s_free = (sup_block or {}).get("free") or []
    s_samples = ((sup_block or {}).get("bootstrap") or {}).get("samples") or []
    for i, row in enumerate(d_samples):
        d = {**d_coef, **dict(zip(d_free, row, strict=False))}
        s = None
        if s_coef:
            s = {
                **s_coef,
                **(
                    dict(zip(s_free, s_samples[i % len(s_samples)], strict=False))
                    if s_samples
                    else {}
                ),
            }
        samples.append(Law(Distillation(**d), Supervised(**s) if s else None))
    return Coefficients(
        law=law,
        source=f"fit: {path}",
        range=data.get("range") or {"N_S": None, "D_S": None, "L_T": None},
        samples=samples,
        fixed=dist.get("fixed") or {},
        tokens_per_answer_token=data.get("tokens_per_answer_token"),
    )


def outside(value: float, bounds: list[float | None] | None) -> float:
    """How far `value` lies outside `bounds` (a factor, 1 when inside or unbounded; a None
    bound is not checked; a value of 0 below a positive bound counts as 1e6 times)."""
    if not bounds:
        return 1.0
    low, high = bounds
    if low is not None and value < low:
        return low / value if value > 0 else 1e6
    if high is not None and value > high:
        return value / high
    return 1.0


@dataclass
class Cell:
    """One (N_S, D_S) candidate."""

    n: float
    d: float
    loss: float
    low: float | None
    high: float | None
    supervised: float | None
    costs: Costs
    within_budget: bool
    extrapolation: dict[str, float]

    @property
    def beats_sft(self) -> bool | None:
        return None if self.supervised is None else self.loss < self.supervised

    def to_json(self) -> dict[str, Any]:
        return {
            "N_S": self.n,
            "D_S": self.d,
            "L_S": self.loss,
            "L_S_interval_90": None if self.low is None else [self.low, self.high],
            "L_supervised": self.supervised,
            "distillation_beats_sft": self.beats_sft,
            "costs": self.costs.to_json(),
            "within_budget": self.within_budget,
            "extrapolation": self.extrapolation,
        }


def predict_cell(
    coef: Coefficients, n: float, d: float, lt: float
) -> tuple[float, float | None, float | None, float | None]:
    """(L_S, 5th, 95th percentile over the bootstrap laws, supervised L~_S)."""
    loss = float(student_loss(coef.law, n, d, lt))
    low = high = None
    if coef.samples:
        values = np.array([float(student_loss(s, n, d, lt)) for s in coef.samples])
        values = values[np.isfinite(values)]
        if len(values):
            low, high = float(np.percentile(values, 5)), float(np.percentile(values, 95))
    sup = None if coef.law.supervised is None else float(supervised_loss(coef.law.supervised, n, d))
    return loss, low, high, sup


def extrapolation(coef: Coefficients, n: float, d: float, lt: float) -> dict[str, float]:
    """Axes on which the cell lies outside the fitted range, with the factor."""
    out = {}
    for axis, value in (("N_S", n), ("D_S", d), ("L_T", lt)):
        factor = outside(value, coef.range.get(axis))
        if factor > 1.0:
            out[axis] = factor
    return out


def best_teacher(law: Law, n: float, d: float) -> float:
    """The teacher cross-entropy that minimises L_S for this student (the sweet spot)."""
    from scipy.optimize import minimize_scalar

    found = minimize_scalar(
        lambda x: float(student_loss(law, n, d, math.exp(x))),
        bounds=(math.log(1e-3), math.log(100.0)),
        method="bounded",
    )
    return float(math.exp(found.x))


def capacity_gap(coef: Coefficients, n: float, d: float, lt: float) -> dict[str, Any] | None:
    """Whether the teacher is past this student's sweet spot, and the best teacher's L_T."""
    if not coef.gap_known or lt <= 0:
        return None
    slope = float(teacher_slope(coef.law, n, d, lt))
    best = best_teacher(coef.law, n, d)
    return {
        "dL_S_dL_T": slope,
        "past_sweet_spot": slope < 0,
        "best_teacher_loss": best,
        "L_S_with_best_teacher": float(student_loss(coef.law, n, d, best)),
    }
