"""What a benchmark reports: one `Result` per figure, checked against its `Target`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

TargetKind = Literal["ratio_at_least", "ratio_at_most", "at_most", "at_least", "info"]


@dataclass(frozen=True)
class Target:
    """A pass condition on a result's ratio (openkd / baseline) or on openkd's own value."""

    kind: TargetKind
    value: float | None = None

    def label(self, unit: str) -> str:
        if self.kind == "info" or self.value is None:
            return "-"
        sign = {"ratio_at_least": ">=", "ratio_at_most": "<=", "at_least": ">=", "at_most": "<="}
        suffix = "" if self.kind.startswith("ratio") else f" {unit}"
        prefix = "ratio " if self.kind.startswith("ratio") else ""
        return f"{prefix}{sign[self.kind]} {self.value:g}{suffix}"

    def check(self, value: float, ratio: float | None) -> bool | None:
        if self.kind == "info" or self.value is None:
            return None
        if self.kind.startswith("ratio"):
            if ratio is None:
                return None
            return ratio >= self.value if self.kind == "ratio_at_least" else ratio <= self.value
        return value >= self.value if self.kind == "at_least" else value <= self.value


INFO = Target("info")


@dataclass(frozen=True)
class Result:
    """One figure: openkd's value, the baseline's (same unit), and the target."""

    benchmark: str
    metric: str
    unit: str
    openkd: float
    baseline: float | None
    baseline_name: str
    target: Target = INFO
    note: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.baseline in (None, 0):
            return None
        return self.openkd / self.baseline

    @property
    def passed(self) -> bool | None:
        return self.target.check(self.openkd, self.ratio)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Result:
        data = dict(data)
        data["target"] = Target(**data["target"])
        return cls(**data)


@dataclass(frozen=True)
class Failure:
    """A benchmark that crashed: reported in RESULTS.md instead of figures."""

    benchmark: str
    error: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
