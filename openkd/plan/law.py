"""The supervised and distillation scaling laws as pure functions (Busbridge et al. 2025).

Supervised (their Equation 1): a model of N non-embedding parameters trained on D tokens reaches
cross-entropy

    L(N, D) = E + (A / N^alpha + B / D^beta)^gamma

Distillation (their Equation 8): a student of N_S parameters distilled on D_S tokens from a
teacher of cross-entropy L_T reaches

    L_S = L_T + L_T^-c0 * (1 + (L_T / (L~_S d1))^(1/f1))^(-c1 f1) * (A' / N_S^alpha' + B' / D_S^beta')^gamma'

where L~_S = L(N_S, D_S) is what the same student would reach trained supervised. The middle
factor is the capacity gap: once the teacher is much better than the student could learn to
be (L_T / L~_S below d1) it is 1, and the L_T^-c0 factor makes a stronger teacher a worse
one past some point; a teacher worse than the student's own reach (L_T / L~_S above d1) drives
it to 0 and the student just copies the teacher (L_S -> L_T).

Without a supervised law (`supervised=None`) the capacity-gap factor is taken as 1 (c1 = 0).
All functions take numbers or numpy arrays and broadcast.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

SUPERVISED_FORM = "L = E + (A / N^alpha + B / D^beta)^gamma"
DISTILLATION_FORM = (
    "L_S = L_T + L_T^-c0 * (1 + (L_T / (L~_S * d1))^(1/f1))^(-c1*f1) "
    "* (A' / N_S^alpha' + B' / D_S^beta')^gamma'"
)


@dataclass(frozen=True)
class Supervised:
    """Coefficients of the supervised law (Equation 1)."""

    E: float
    A: float
    alpha: float
    B: float
    beta: float
    gamma: float

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Distillation:
    """Coefficients of the distillation law (Equation 8); A..gamma are the paper's primed ones."""

    A: float
    alpha: float
    B: float
    beta: float
    gamma: float
    c0: float = 0.0
    c1: float = 0.0
    f1: float = 1.0
    d1: float = 1.0

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


SUPERVISED_NAMES = tuple(f.name for f in dataclasses.fields(Supervised))
DISTILLATION_NAMES = tuple(f.name for f in dataclasses.fields(Distillation))


@dataclass(frozen=True)
class Law:
    """A distillation law, with the supervised law that gives it L~_S when there is one."""

    distillation: Distillation
    supervised: Supervised | None = None


def _arr(x: Any) -> np.ndarray:
    return np.asarray(x, dtype=float)


def log_power_sum(log_a: Any, alpha: Any, log_b: Any, beta: Any, n: Any, d: Any) -> np.ndarray:
    """log(A / N^alpha + B / D^beta), computed without overflow."""
    return np.logaddexp(log_a - alpha * np.log(_arr(n)), log_b - beta * np.log(_arr(d)))


def supervised_loss(s: Supervised, n: Any, d: Any) -> np.ndarray:
    """L(N, D) of Equation 1."""
    return s.E + np.exp(s.gamma * log_power_sum(np.log(s.A), s.alpha, np.log(s.B), s.beta, n, d))


def log_mimic(law: Distillation, n: Any, d: Any, lt: Any, ls_tilde: Any | None) -> np.ndarray:
    """log of Equation 8's second term, the student's distance from its teacher."""
    lt = _arr(lt)
    c0, c1 = _arr(law.c0), _arr(law.c1)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_lt = np.log(lt)
        # c0 = 0 with L_T = 0 (a deterministic teacher) is a factor of 1, not 0 * inf.
        teacher = np.where(c0 == 0, 0.0, -c0 * log_lt)
        gap: Any = 0.0
        if ls_tilde is not None:
            z = (log_lt - np.log(_arr(ls_tilde)) - np.log(law.d1)) / law.f1
            gap = np.where(c1 == 0, 0.0, -c1 * law.f1 * np.logaddexp(0.0, z))
    power = law.gamma * log_power_sum(np.log(law.A), law.alpha, np.log(law.B), law.beta, n, d)
    return teacher + gap + power


def student_loss(law: Law, n: Any, d: Any, lt: Any) -> np.ndarray:
    """L_S(N_S, D_S, L_T) of Equation 8."""
    ls_tilde = None if law.supervised is None else supervised_loss(law.supervised, n, d)
    return _arr(lt) + np.exp(log_mimic(law.distillation, n, d, lt, ls_tilde))


def teacher_slope(law: Law, n: Any, d: Any, lt: Any, step: float = 1e-4) -> np.ndarray:
    """dL_S/dL_T: negative where a weaker teacher would give a better student (capacity gap)."""
    lt = _arr(lt)
    h = step * np.maximum(lt, 1e-6)
    return (student_loss(law, n, d, lt + h) - student_loss(law, n, d, np.maximum(lt - h, 0))) / (
        lt + h - np.maximum(lt - h, 0)
    )
