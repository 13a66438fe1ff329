"""`openkd plan` settings: predict (`plan:`), fit (`plan_fit:`) and the pilot sweep
(`plan_pilot:`), one typed field per flag and YAML key."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from openkd.config import StageConfig

# The fields of `openkd.plan.law.Distillation` (kept here so `openkd --help` loads no numpy).
DISTILLATION_NAMES = ("A", "alpha", "B", "beta", "gamma", "c0", "c1", "f1", "d1")

TEACHER_LOSS_HELP = (
    "The teacher's cross-entropy L_T (nats/token) on the held-out answers: one number for every "
    "pilot, or TEACHER=NUMBER per teacher name in the eval reports."
)
TEACHER_MODEL_HELP = (
    "Measure L_T instead: this teacher's NLL of the same held-out answers eval scored the "
    "student on (transformers; it must share the student's tokenizer for L_T and L_S to be "
    "comparable)."
)
FIX_HELP = (
    "Fix a distillation coefficient instead of fitting it, NAME=VALUE: A, alpha, B, "
    "beta, gamma, c0, c1, f1, d1; e.g. c0=2.549, the paper's."
)
_SUFFIX = {"": 1.0, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}
_NUMBER = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kmbgt]?)\s*$", re.IGNORECASE)


def as_text_list(value: Any) -> Any:
    """A YAML scalar or list of numbers as the list of strings a repeated flag gives."""
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    return [str(v) if isinstance(v, int | float) and not isinstance(v, bool) else v for v in items]


def parse_count(text: str) -> float | None:
    """A count such as 2e9, 500M, 1.5B or 10k; None when `text` is not one."""
    match = _NUMBER.match(str(text))
    if not match:
        return None
    value = float(match.group(1)) * _SUFFIX[match.group(2).lower()]
    return value if math.isfinite(value) and value > 0 else None


def parse_fix(values: list[str]) -> dict[str, float]:
    """`--fix NAME=VALUE` pairs; ValueError naming the first bad one."""
    out: dict[str, float] = {}
    for value in values:
        name, _, number = value.partition("=")
        if name not in DISTILLATION_NAMES:
            raise ValueError(
                f"{value}: {name!r} is not a coefficient; use one of {', '.join(DISTILLATION_NAMES)}"
            )
        try:
            out[name] = float(number)
        except ValueError:
            raise ValueError(f"{value}: expected NAME=NUMBER") from None
        if not math.isfinite(out[name]) or out[name] < 0:
            raise ValueError(f"{value}: coefficients are finite and >= 0")
    return out


class PlanConfig(StageConfig):
    """Predict a distilled student's cross-entropy over student sizes x token budgets, with the
    supervised baseline, costs and a recommendation within a budget (Busbridge et al. 2025)."""

    section: ClassVar[str] = "plan"

    fit: Path | None = Field(
        None, description="Coefficients fitted by `openkd plan fit` (fit.json)."
    )
    prior: bool = Field(
        False,
        description="Use the paper's published coefficients (Table 6) instead: fitted on muP "
        "transformers on C4, so outside that setting a shape, not a prediction.",
    )
    teacher_loss: float | None = Field(
        None, ge=0, description="The teacher's cross-entropy L_T in nats/token."
    )
    teacher_model: str | None = Field(
        None,
        description="The teacher's directory: its config.json gives N_T for labelling costs, "
        "and with --held-out its NLL gives L_T.",
    )
    held_out: Path | None = Field(
        None,
        description="Held-out prompts with the teacher's answers (an eval examples.jsonl or "
        "generate's <stem>.eval.jsonl) to measure L_T on with --teacher-model.",
    )
    teacher_params: float | None = Field(
        None,
        gt=0,
        le=1e15,
        description="The teacher's non-embedding parameters N_T (default: from --teacher-model).",
    )
    students: list[str] = Field(
        default_factory=list,
        description="Candidate student sizes: non-embedding parameters (150M, 1.5e9) or a model "
        "directory.",
    )
    tokens: list[str] = Field(
        default_factory=list,
        description="Candidate token budgets D_S: answer tokens the student trains on (500M, 2e9).",
    )
    budget_flops: float | None = Field(
        None, gt=0, le=1e32, description="Budget in FLOPs: teacher labelling plus student training."
    )
    budget_gpu_hours: float | None = Field(
        None, gt=0, le=1e12, description="Budget in GPU-hours (at --gpu-flops per GPU)."
    )
    gpu_flops: float = Field(
        4e14,
        gt=0,
        le=1e19,
        description="Sustained FLOP/s of one GPU, to turn FLOPs into GPU-hours (default: 40 % "
        "of an H100's 989 TFLOP/s dense bf16).",
    )
    meta: Path | None = Field(
        None,
        description="Stage 1's <stem>.meta.json: cost labelling at its measured tokens/s on its "
        "GPUs instead of 2 N_T FLOPs per token.",
    )
    epochs: float = Field(
        1.0,
        gt=0,
        le=10_000,
        description="Passes over the labels: the teacher labels D_S / epochs tokens.",
    )
    tokens_per_answer_token: float | None = Field(
        None,
        ge=1,
        le=1e6,
        description="Tokens the student reads per answer token it learns from (prompts add to "
        "training cost; default: measured on the fit's pilots, else 1).",
    )
    logprobs: int | None = Field(
        None, gt=0, le=10_000, description="Also cost a --logprobs K sidecar (storage)."
    )
    logprobs_dtype: Literal["float16", "float32"] = Field(
        "float16", description="Sidecar value type for --logprobs."
    )
    output_dir: Path = Field(Path("plan"), description="plan.json and plan.png are written here.")
    plot: bool = Field(True, description="Draw plan.png.")

    _lists = field_validator("students", "tokens", mode="before")(as_text_list)

    @model_validator(mode="after")
    def _check(self) -> PlanConfig:
        problems = []
        if (self.fit is None) == (not self.prior):
            problems.append(
                "pass --fit FILE (from openkd plan fit) or --prior (the paper's coefficients), one of them"
            )
        if self.budget_flops is not None and self.budget_gpu_hours is not None:
            problems.append("--budget-flops and --budget-gpu-hours: pass one budget")
        if self.teacher_loss is None and not (self.teacher_model and self.held_out):
            problems.append(
                "--teacher-loss is required (or --teacher-model with --held-out to measure it)"
            )
        if self.held_out is not None and not self.teacher_model:
            problems.append("--held-out is scored with --teacher-model: pass it too")
        if not self.students:
            problems.append("--students is required: candidate sizes (repeat the flag)")
        if not self.tokens:
            problems.append("--tokens is required: candidate token budgets (repeat the flag)")
        bad = [t for t in self.tokens if parse_count(t) is None]
        if bad:
            problems.append(f"--tokens {bad[0]}: expected a count such as 2e9 or 500M")
        if self.chosen("logprobs_dtype") and self.logprobs is None:
            problems.append(
                "--logprobs-dtype applies with --logprobs: pass it or drop --logprobs-dtype"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self


class FitConfig(StageConfig):
    """Fit the distillation scaling law to pilot runs (openkd eval reports of openkd train
    students, or a JSONL of runs); writes the coefficients, their bootstrap uncertainty and the
    residuals."""

    section: ClassVar[str] = "plan_fit"

    pilots: list[str] = Field(
        default_factory=list,
        description="Distillation pilots: eval reports (report.json or its directory) or JSONL "
        "files of runs.",
    )
    supervised: list[str] = Field(
        default_factory=list,
        description="Pilots of students trained on the data instead of a teacher: they fit the "
        "SFT baseline and, with 3+ teachers, the capacity-gap break.",
    )
    teacher_loss: list[str] = Field(default_factory=list, description=TEACHER_LOSS_HELP)
    teacher_model: str | None = Field(None, description=TEACHER_MODEL_HELP)
    fix: list[str] = Field(default_factory=list, description=FIX_HELP)
    bootstrap: int = Field(
        200, ge=0, le=100_000, description="Bootstrap resamples for the uncertainty (0: none)."
    )
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed of the fit's starts and resamples.")
    output: Path = Field(Path("plan/fit.json"), description="Where the fit is written.")

    _lists = field_validator("pilots", "supervised", "teacher_loss", "fix", mode="before")(
        as_text_list
    )

    @model_validator(mode="after")
    def _check(self) -> FitConfig:
        problems = []
        if not self.pilots:
            problems.append("give the pilots to fit: PILOT... (eval reports or JSONL files)")
        problems += _fit_problems(self.teacher_loss, self.teacher_model, self.fix)
        if problems:
            raise ValueError("; ".join(problems))
        return self


class PilotConfig(StageConfig):
    """Run a sweep of pilot trainings from a recipe (student sizes x --max-steps budgets) with
    the recipe's generate, train and eval stages, resumably, then fit the law to them."""

    section: ClassVar[str] = "plan_pilot"

    students: list[str] = Field(
        default_factory=list,
        description="Student models to start each size from (directories or Hub ids).",
    )
    hidden_sizes: list[int] = Field(
        default_factory=list,
        description="Or: build tiny students (openkd make-tiny) of these hidden sizes, with the "
        "tokenizer make-tiny always builds.",
    )
    tiny_layers: int = Field(2, gt=0, le=64, description="Layers of the --hidden-sizes students.")
    max_steps: list[int] = Field(
        default_factory=list,
        description="Token budgets as training steps: each size trains once per value.",
    )
    output_dir: Path = Field(
        Path("pilots"), description="Each pilot's student and eval report, and fit.json, go here."
    )
    teacher_loss: list[str] = Field(default_factory=list, description=TEACHER_LOSS_HELP)
    teacher_model: str | None = Field(None, description=TEACHER_MODEL_HELP)
    fix: list[str] = Field(default_factory=list, description=FIX_HELP)
    bootstrap: int = Field(200, ge=0, le=100_000, description="Bootstrap resamples of the fit.")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed of the fit.")
    fit: bool = Field(
        True,
        description="Fit the law after the sweep (--no-fit: only run the pilots, e.g. a held-out one).",
    )

    _lists = field_validator("students", "teacher_loss", "fix", mode="before")(as_text_list)

    @model_validator(mode="after")
    def _check(self) -> PilotConfig:
        problems = []
        if not self.students and not self.hidden_sizes:
            problems.append("--students or --hidden-sizes is required: the student sizes to sweep")
        if self.students and self.hidden_sizes:
            problems.append("--students and --hidden-sizes: pass one")
        if not self.max_steps:
            problems.append("--max-steps is required: the step budgets to sweep (repeat the flag)")
        if any(s <= 0 for s in self.max_steps) or any(h < 32 or h % 32 for h in self.hidden_sizes):
            problems.append("--max-steps are > 0 and --hidden-sizes multiples of 32")
        problems += _fit_problems(self.teacher_loss, self.teacher_model, self.fix)
        if problems:
            raise ValueError("; ".join(problems))
        return self


def _fit_problems(teacher_loss: Any, teacher_model: Any, fix: Any) -> list[str]:
    """The checks every command that fits the law shares: one teacher source, a valid --fix."""
    problems = []
    if teacher_loss and teacher_model:
        problems.append("--teacher-loss and --teacher-model: pass one")
    try:
        parse_fix(fix)
    except ValueError as err:
        problems.append(f"--fix {err}")
    return problems
