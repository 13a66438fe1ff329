"""The paper's published coefficients: a labelled prior for planning before any pilot exists.

Source: Busbridge et al. 2025, "Distillation Scaling Laws", arXiv 2502.08606v2, Appendix F.3,
Table 6 (point estimates with 90 % bootstrap intervals, 4096 resamples). The supervised law was
fitted on 73 runs, the distillation law on 697. Their setting: decoder-only transformers with
muP, 143M-12.6B non-embedding parameters, English C4, sequence length 4096, pure distillation
(lambda = 1, the teacher's full distribution, temperature 1), cross-entropies measured against
the data in nats per token. The authors say the coefficients are specific to their architecture
and data: outside that setting they are a shape to start from, not a prediction; fit your own
with `openkd plan fit`.
"""

from __future__ import annotations

from typing import Any

from openkd.plan.law import Distillation, Law, Supervised

SOURCE = (
    "Busbridge et al. 2025, Distillation Scaling Laws, arXiv 2502.08606v2, Table 6 (Appendix F.3)"
)
SETTING = (
    "muP decoder-only transformers, 143M-12.6B non-embedding parameters, English C4, pure "
    "distillation (lambda=1, tau=1) on the teacher's full distribution; cross-entropy against "
    "the data, nats/token"
)

SUPERVISED = Supervised(E=1.220, A=3355.0, alpha=0.408, B=18186.0, beta=0.431, gamma=0.452)
DISTILLATION = Distillation(
    A=2243.0,
    alpha=0.321,
    B=24181.0,
    beta=0.637,
    gamma=0.764,
    c0=2.549,
    c1=522.6,
    f1=0.090,
    d1=1.315,
)
# 90 % intervals as published.
SUPERVISED_INTERVALS: dict[str, tuple[float, float]] = {
    "E": (1.190, 1.247),
    "A": (3346.0, 3360.0),
    "alpha": (0.405, 0.411),
    "B": (18157.0, 18236.0),
    "beta": (0.428, 0.433),
    "gamma": (0.442, 0.461),
}
DISTILLATION_INTERVALS: dict[str, tuple[float, float]] = {
    "A": (2227.0, 2255.0),
    "alpha": (0.319, 0.324),
    "B": (24084.0, 24266.0),
    "beta": (0.634, 0.640),
    "gamma": (0.732, 0.788),
    "c0": (2.425, 2.615),
    "c1": (522.6, 522.6),
    "f1": (0.088, 0.093),
    "d1": (1.302, 1.327),
}
# Where the paper observed models: 143M-12.6B parameters, trained on "a few billion to 512B
# tokens" (Section 1); outside it even their own coefficients extrapolate. No lower token bound
# is stated, so none is checked.
RANGE: dict[str, list[float | None] | None] = {
    "N_S": [1.43e8, 1.26e10],
    "D_S": [None, 5.12e11],
    "L_T": None,
}

LAW = Law(distillation=DISTILLATION, supervised=SUPERVISED)


def describe() -> dict[str, Any]:
    """The prior as it is written into plan.json."""
    return {
        "source": SOURCE,
        "setting": SETTING,
        "supervised": {
            "coefficients": SUPERVISED.to_dict(),
            "interval_90": {k: list(v) for k, v in SUPERVISED_INTERVALS.items()},
        },
        "distillation": {
            "coefficients": DISTILLATION.to_dict(),
            "interval_90": {k: list(v) for k, v in DISTILLATION_INTERVALS.items()},
        },
        "range": RANGE,
    }
