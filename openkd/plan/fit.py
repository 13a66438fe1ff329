"""Fit the laws to pilot runs: robust least squares in log space, bootstrap uncertainty.

As in the paper (Appendix F.1-F.2, after Hoffmann et al. 2022): minimise the Huber loss
(delta 1e-4) of log(predicted) - log(observed) over the runs, from many starting points, here
with scipy's trust-region least squares. The starting points are the best of a few thousand
random points of the coefficient box, each scored in one vectorised pass. Uncertainty comes
from refitting on pilots resampled with replacement (the paper's Table 6 uses 4096 resamples;
the default here is 200).

Pilots identify a coefficient only when they vary what it governs: exponents need at least 3
student sizes and 3 token budgets, c0 needs 2 or more teachers, the capacity-gap break (c1, d1)
needs 3 or more teachers and a supervised law. A coefficient the pilots cannot identify is
fixed, and the reason is recorded; too few pilots for the rest is a one-line error naming what
to add.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from openkd.errors import OpenkdError
from openkd.plan import prior
from openkd.plan.law import (
    DISTILLATION_NAMES,
    SUPERVISED_NAMES,
    Distillation,
    Law,
    Supervised,
    log_mimic,
    log_power_sum,
    student_loss,
    supervised_loss,
)

HUBER_DELTA = 1e-4  # the paper's delta, on log cross-entropy
MIN_VALUES = 3  # distinct student sizes and token budgets needed
SAME = 0.01  # values within 1 % are one size or one budget
RANDOM_STARTS = 4000
POLISHED_STARTS = 6


class Unidentifiable(OpenkdError):
    """The pilots cannot identify the law's coefficients; the message names what to add."""


@dataclass(frozen=True)
class Point:
    """One pilot: student size, tokens, measured cross-entropy, teacher cross-entropy."""

    name: str
    n: float
    d: float
    loss: float
    lt: float | None = None


@dataclass(frozen=True)
class Param:
    """A coefficient as the optimiser sees it: on a log scale or not, its bounds, and the box
    its random starting points are drawn from (in the optimiser's scale)."""

    name: str
    log: bool
    low: float
    high: float
    start: tuple[float, float]


@dataclass
class FitResult:
    """One fitted law: coefficients, which were fixed and why, bootstrap samples, residuals."""

    kind: str  # supervised | distillation
    coefficients: dict[str, float]
    free: list[str]
    fixed: dict[str, str]
    samples: list[dict[str, float]] = field(default_factory=list)
    resamples: int = 0
    residuals: list[dict[str, Any]] = field(default_factory=list)

    def uncertainty(self) -> dict[str, dict[str, float]]:
        """Per free coefficient: bootstrap std and 90 % interval (5th-95th percentile)."""
        out: dict[str, dict[str, float]] = {}
        for name in self.free:
            values = np.array([s[name] for s in self.samples])
            if len(values) < 2:
                continue
            out[name] = {
                "std": float(values.std(ddof=1)),
                "low": float(np.percentile(values, 5)),
                "high": float(np.percentile(values, 95)),
            }
        return out

    def to_json(self) -> dict[str, Any]:
        errors = [abs(r["relative_error"]) for r in self.residuals]
        return {
            "coefficients": self.coefficients,
            "free": self.free,
            "fixed": self.fixed,
            "uncertainty_90": self.uncertainty(),
            "bootstrap": {
                "resamples": self.resamples,
                "used": len(self.samples),
                "samples": [[s[k] for k in self.free] for s in self.samples],
            },
            "residuals": self.residuals,
            "relative_error": {
                "mean_abs": float(np.mean(errors)) if errors else None,
                "max_abs": float(np.max(errors)) if errors else None,
            },
        }


# --- identification -----------------------------------------------------------------------


def distinct(values: Sequence[float]) -> list[float]:
    """The distinct values, those within 1 % of the previous one counted once."""
    out: list[float] = []
    for v in sorted(values):
        if not out or abs(v - out[-1]) > SAME * max(abs(out[-1]), 1e-12):
            out.append(v)
    return out


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def identification_problems(points: Sequence[Point], n_free: int) -> list[str]:
    """What stops `points` from identifying `n_free` coefficients (empty when nothing does)."""
    problems = []
    sizes = distinct([p.n for p in points])
    budgets = distinct([p.d for p in points])
    if len(sizes) < MIN_VALUES:
        problems.append(
            f"{len(sizes)} student size(s) (N_S = {', '.join(map(_fmt, sizes))}): add pilots at "
            f"{MIN_VALUES - len(sizes)} more size(s)"
        )
    if len(budgets) < MIN_VALUES:
        problems.append(
            f"{len(budgets)} token budget(s) (D_S = {', '.join(map(_fmt, budgets))}): add pilots "
            f"with {MIN_VALUES - len(budgets)} more --max-steps value(s)"
        )
    if len(points) <= n_free:
        problems.append(
            f"{len(points)} pilot(s) for {n_free} coefficients: add at least "
            f"{n_free + 1 - len(points)} more"
        )
    return problems


def require_identifiable(points: Sequence[Point], n_free: int, what: str) -> None:
    problems = identification_problems(points, n_free)
    if problems:
        raise Unidentifiable(
            f"the {what} pilots cannot identify the law: {'; '.join(problems)} (each size at "
            f"{MIN_VALUES}+ token budgets works best; `openkd plan pilot` runs such a sweep)"
        )


# --- the optimiser -------------------------------------------------------------------------


def _to_natural(spec: Param, x: float) -> float:
    return math.exp(x) if spec.log else x


def _to_internal(spec: Param, value: float) -> float:
    return math.log(value) if spec.log else value


def _huber_sum(r: np.ndarray) -> np.ndarray:
    a = np.abs(r)
    return np.where(a <= HUBER_DELTA, 0.5 * r**2, HUBER_DELTA * (a - 0.5 * HUBER_DELTA)).sum(
        axis=-1
    )


def _optimise(
    specs: list[Param],
    residuals: Callable[[np.ndarray], np.ndarray],
    rng: np.random.Generator,
    start: np.ndarray | None = None,
) -> np.ndarray:
    """The internal coefficient vector minimising the Huber loss of `residuals`.

    `residuals(X)` takes a (k, p) batch and returns (k, n). Without `start`, the best of
    RANDOM_STARTS random points are polished; with it, only `start` is."""
    from scipy.optimize import least_squares

    low = np.array([s.low for s in specs])
    high = np.array([s.high for s in specs])
    if start is None:
        box_lo = np.array([s.start[0] for s in specs])
        box_hi = np.array([s.start[1] for s in specs])
        draws = box_lo + (box_hi - box_lo) * rng.random((RANDOM_STARTS, len(specs)))
        with np.errstate(all="ignore"):
            scores = _huber_sum(residuals(draws))
        scores = np.where(np.isfinite(scores), scores, np.inf)
        starts = draws[np.argsort(scores)[:POLISHED_STARTS]]
    else:
        starts = start[None, :]
    best, best_cost = None, np.inf
    for x0 in starts:
        x0 = np.clip(x0, low + 1e-9, high - 1e-9)
        # Plain least squares first (quick to converge), then the Huber loss from there: with
        # the paper's tiny delta it is nearly L1, which converges slowly from far away.
        for loss, budget in (("linear", 400), ("huber", 300)):
            with np.errstate(all="ignore"):
                x0 = least_squares(
                    lambda x: np.nan_to_num(residuals(x[None, :])[0], nan=1e3, posinf=1e3),
                    x0,
                    bounds=(low, high),
                    loss=loss,
                    f_scale=HUBER_DELTA,
                    x_scale="jac",
                    max_nfev=budget,
                ).x
        cost = float(_huber_sum(residuals(x0[None, :]))[0])
        if np.isfinite(cost) and cost < best_cost:
            best, best_cost = x0, cost
    if best is None:
        raise OpenkdError(
            "the fit found no coefficients that predict the pilots' cross-entropies; check the "
            "pilots' L_S and L_T values (each must be a positive, finite number of nats/token)"
        )
    return best


# --- supervised law ------------------------------------------------------------------------


def _supervised_specs(points: Sequence[Point]) -> dict[str, Param]:
    floor = min(p.loss for p in points)
    return {
        "E": Param("E", False, 0.0, floor, (0.0, 0.95 * floor)),
        "A": Param("A", True, -30.0, 80.0, (-5.0, 25.0)),
        "alpha": Param("alpha", False, 0.0, 3.0, (0.02, 1.5)),
        "B": Param("B", True, -30.0, 80.0, (-5.0, 25.0)),
        "beta": Param("beta", False, 0.0, 3.0, (0.02, 1.5)),
        "gamma": Param("gamma", False, 0.02, 5.0, (0.2, 2.0)),
    }


def _supervised_from(values: dict[str, float]) -> Supervised:
    return Supervised(**{k: values[k] for k in SUPERVISED_NAMES})


def fit_supervised(
    points: Sequence[Point],
    *,
    fixed: dict[str, float] | None = None,
    bootstrap: int = 200,
    seed: int = 0,
) -> FitResult:
    """Fit Equation 1 to supervised pilots (students trained on the data, not the teacher)."""
    fixed = dict(fixed or {})
    specs = _supervised_specs(points)
    free = [name for name in SUPERVISED_NAMES if name not in fixed]
    require_identifiable(points, len(free), "supervised")

    def make(pts: Sequence[Point]) -> Callable[[np.ndarray], np.ndarray]:
        n = np.array([p.n for p in pts])
        d = np.array([p.d for p in pts])
        y = np.log(np.array([p.loss for p in pts]))

        def residuals(x: np.ndarray) -> np.ndarray:
            v = _batch_values(free, specs, fixed, x)
            power = v["gamma"][:, None] * log_power_sum(
                np.log(v["A"])[:, None], v["alpha"][:, None], np.log(v["B"])[:, None],
                v["beta"][:, None], n[None, :], d[None, :],
            )  # fmt: skip
            return np.logaddexp(np.log(v["E"])[:, None], power) - y[None, :]

        return residuals

    fixed_reasons = {name: "fixed with --fix" for name in fixed}
    result = _fit(free, specs, fixed, make, points, bootstrap, seed, "supervised", fixed_reasons)
    law = _supervised_from(result.coefficients)
    result.residuals = _residuals(points, supervised_loss(law, *_nd(points)))
    return result


# --- distillation law ---------------------------------------------------------------------


def _distillation_specs() -> dict[str, Param]:
    return {
        "A": Param("A", True, -30.0, 80.0, (-5.0, 25.0)),
        "alpha": Param("alpha", False, 0.0, 3.0, (0.02, 1.5)),
        "B": Param("B", True, -30.0, 80.0, (-5.0, 25.0)),
        "beta": Param("beta", False, 0.0, 3.0, (0.02, 1.5)),
        "gamma": Param("gamma", False, 0.02, 5.0, (0.2, 2.0)),
        "c0": Param("c0", False, 0.0, 10.0, (0.0, 4.0)),
        "c1": Param("c1", False, 0.0, 1000.0, (0.0, 50.0)),
        "f1": Param("f1", False, 0.01, 5.0, (0.05, 1.0)),
        "d1": Param("d1", True, -5.0, 5.0, (-1.0, 1.0)),
    }


def distillation_fixed(
    points: Sequence[Point], supervised: Supervised | None, user: dict[str, float]
) -> tuple[dict[str, float], dict[str, str]]:
    """The coefficients the pilots cannot identify, each with its value and the reason."""
    teachers = distinct([p.lt for p in points if p.lt is not None])
    values: dict[str, float] = {}
    reasons: dict[str, str] = {}
    if "c0" not in user and (len(teachers) < 2 or min(teachers) <= 0):
        values["c0"] = 0.0
        reasons["c0"] = (
            f"pilots with one teacher (L_T = {_fmt(teachers[0])}) cannot identify c0; its "
            "factor L_T^-c0 is absorbed into A' and B', so predictions for another teacher "
            "are extrapolations"
            if len(teachers) == 1
            else "c0 needs 2+ teachers with L_T > 0"
        )
    gap = [name for name in ("c1", "d1", "f1") if name not in user]
    if supervised is None or len(teachers) < 3:
        why = (
            "no supervised pilots (--supervised) give L~_S"
            if supervised is None
            else f"{len(teachers)} teacher(s), 3+ needed"
        )
        if "c1" in gap:
            values["c1"] = 0.0
            reasons["c1"] = f"capacity-gap break not modelled ({why}): c1 = 0"
        for name in ("d1", "f1"):
            if name in gap:
                values[name] = getattr(prior.DISTILLATION, name)
                reasons[name] = "unused while c1 = 0 (paper's value kept)"
    elif "f1" in gap:
        values["f1"] = prior.DISTILLATION.f1
        reasons["f1"] = (
            "sharpness of the capacity-gap break: the paper's 0.090 (pilots rarely resolve it)"
        )
    for name, value in user.items():
        values[name] = value
        reasons[name] = "fixed with --fix"
    return values, reasons


def fit_distillation(
    points: Sequence[Point],
    supervised: Supervised | None = None,
    *,
    fixed: dict[str, float] | None = None,
    bootstrap: int = 200,
    seed: int = 0,
) -> FitResult:
    """Fit Equation 8 to distillation pilots (each with its teacher's L_T)."""
    missing = [p.name for p in points if p.lt is None]
    if missing:
        raise OpenkdError(
            f"pilot {missing[0]} has no teacher cross-entropy L_T; pass --teacher-loss VALUE "
            "or --teacher-model DIR to measure it"
        )
    values, reasons = distillation_fixed(points, supervised, dict(fixed or {}))
    specs = _distillation_specs()
    free = [name for name in DISTILLATION_NAMES if name not in values]
    require_identifiable(points, len(free), "distillation")

    def make(pts: Sequence[Point]) -> Callable[[np.ndarray], np.ndarray]:
        n, d = _nd(pts)
        lt = np.array([p.lt for p in pts], dtype=float)
        tilde = None if supervised is None else supervised_loss(supervised, n, d)
        y = np.log(np.array([p.loss for p in pts]))

        def residuals(x: np.ndarray) -> np.ndarray:
            v = _batch_values(free, specs, values, x)
            law = Distillation(**{k: v[k][:, None] for k in DISTILLATION_NAMES})  # type: ignore[arg-type]
            mimic = log_mimic(law, n[None, :], d[None, :], lt[None, :], tilde)
            with np.errstate(divide="ignore"):
                return np.logaddexp(np.log(lt)[None, :], mimic) - y[None, :]

        return residuals

    result = _fit(free, specs, values, make, points, bootstrap, seed, "distillation", reasons)
    law = Law(Distillation(**result.coefficients), supervised)
    n, d = _nd(points)
    result.residuals = _residuals(points, student_loss(law, n, d, [p.lt for p in points]))
    return result


# --- shared -------------------------------------------------------------------------------


def _nd(points: Sequence[Point]) -> tuple[np.ndarray, np.ndarray]:
    return np.array([p.n for p in points], dtype=float), np.array(
        [p.d for p in points], dtype=float
    )


def _batch_values(
    free: list[str], specs: dict[str, Param], fixed: dict[str, float], x: np.ndarray
) -> dict[str, np.ndarray]:
    """Natural-scale coefficient columns for a (k, len(free)) batch, fixed ones broadcast."""
    out = {name: np.full(len(x), value, dtype=float) for name, value in fixed.items()}
    for i, name in enumerate(free):
        out[name] = np.exp(x[:, i]) if specs[name].log else x[:, i]
    return out


def _fit(
    free: list[str],
    specs: dict[str, Param],
    fixed: dict[str, float],
    make: Callable[[Sequence[Point]], Callable[[np.ndarray], np.ndarray]],
    points: Sequence[Point],
    bootstrap: int,
    seed: int,
    kind: str,
    reasons: dict[str, str],
) -> FitResult:
    rng = np.random.default_rng(seed)
    free_specs = [specs[name] for name in free]
    best = _optimise(free_specs, make(points), rng)
    natural = {name: _to_natural(specs[name], float(x)) for name, x in zip(free, best, strict=True)}
    coefficients = {**{k: float(v) for k, v in fixed.items()}, **natural}
    samples = []
    for _ in range(bootstrap):
        picked = [points[i] for i in rng.integers(0, len(points), len(points))]
        if identification_problems(picked, len(free)):
            continue  # a resample that lost a size or a budget identifies nothing
        x = _optimise(free_specs, make(picked), rng, start=best)
        samples.append(
            {name: _to_natural(specs[name], float(v)) for name, v in zip(free, x, strict=True)}
        )
    order = [n for n in (SUPERVISED_NAMES if kind == "supervised" else DISTILLATION_NAMES)]
    return FitResult(
        kind=kind,
        coefficients={k: coefficients[k] for k in order},
        free=free,
        fixed={k: reasons.get(k, "fixed") for k in order if k in fixed},
        samples=samples,
        resamples=bootstrap,
    )


def _residuals(points: Sequence[Point], predicted: np.ndarray) -> list[dict[str, Any]]:
    out = []
    for p, pred in zip(points, np.asarray(predicted, dtype=float), strict=True):
        out.append(
            {
                "pilot": p.name,
                "N_S": p.n,
                "D_S": p.d,
                "L_T": p.lt,
                "observed": p.loss,
                "predicted": float(pred),
                "residual": float(p.loss - pred),
                "relative_error": float((pred - p.loss) / p.loss),
            }
        )
    return out
