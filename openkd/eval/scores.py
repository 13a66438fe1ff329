"""Benchmark mode's numbers: each model's graded samples turned into pass@1, pass@k, stop rate
and length per benchmark; report.json, examples.jsonl rows and the side-by-side table.

pass@1 is the mean over problems of the share of a problem's N samples that are correct (with
N = 1 and greedy decoding: plain final-answer accuracy); its ± is the standard error of that
mean over problems. pass@k for k <= N is the unbiased estimator of Chen et al. (2021)
averaged over problems. The gain is the student's value minus the base model's, in points.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from openkd.data.metadata import now, redact
from openkd.data.schema import FINISH_STOP
from openkd.eval import metrics as m
from openkd.eval import report as rp
from openkd.system import library_versions

if TYPE_CHECKING:
    from openkd.eval.config import EvalConfig
    from openkd.eval.examples import Decoding
    from openkd.eval.tasks import Loaded

MODE = "benchmark"
ROLES = ("student", "base", "teacher")


@dataclass(frozen=True)
class Graded:
    """One sampled answer and its verdict against the gold answer."""

    text: str
    finish_reason: str
    tokens: int
    correct: bool
    answer: str | None  # the final answer extracted from the text, None if none was found
    reason: str | None = None  # why it is not correct
    error: str | None = None  # the request failed

    def as_row(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None or k == "answer"}


def model_metrics(problems: list[list[Graded]]) -> dict[str, Any]:
    """One model's scores on one benchmark; every problem has the same number of samples."""
    n = len(problems[0]) if problems else 1
    counts = [sum(g.correct for g in samples) for samples in problems]
    out: dict[str, Any] = {"problems": len(problems), "samples": n}
    for k in m.pass_ks(n):
        out[f"pass@{k}"] = m.mean([m.pass_at_k(n, c, k) for c in counts])
    out["pass@1_stderr"] = _stderr([c / n for c in counts])
    flat = [g for samples in problems for g in samples]
    ok = [g for g in flat if g.error is None]
    out["stop_rate"] = m.mean([g.finish_reason == FINISH_STOP for g in flat])
    out["mean_tokens"] = m.mean([g.tokens for g in ok])
    out["no_answer"] = m.mean([g.answer is None for g in ok])
    out["failed"] = len(flat) - len(ok)
    return out


def _stderr(values: list[float]) -> float | None:
    if len(values) < 2:
        return None
    mu = m.mean(values)
    variance = sum((v - mu) ** 2 for v in values) / (len(values) - 1)
    return math.sqrt(variance / len(values))


def gain(student: dict[str, Any], base: dict[str, Any]) -> dict[str, float]:
    """The student's pass@k minus the base model's, for every k both have."""
    return {
        key: student[key] - base[key]
        for key in student
        if key.startswith("pass@") and not key.endswith("stderr") and key in base
    }


def build_report(
    cfg: EvalConfig,
    loaded: list[Loaded],
    graded: dict[str, list[list[list[Graded]]]],  # role -> benchmark -> problem -> samples
    names: dict[str, str],
    decoding: Decoding,
    timings: dict[str, rp.Timing],
    length_unit: str,
    fingerprint: str,
    started: float,
) -> dict[str, Any]:
    benchmarks = []
    for b, part in enumerate(loaded):
        models: dict[str, dict[str, Any]] = {
            role: {"name": names[role], "metrics": model_metrics(graded[role][b])}
            for role in ROLES
            if role in graded
        }
        entry: dict[str, Any] = {
            "name": part.task.name,
            "resolution": part.task.resolution(),
            "problems": len(part.items),
            "rows_without_gold": part.without_gold,
            "models": models,
        }
        if "student" in models and "base" in models:
            entry["gain"] = gain(models["student"]["metrics"], models["base"]["metrics"])
        benchmarks.append(entry)
    versions: dict[str, str] = {}
    for t in timings.values():
        versions.update(t.versions)
    return {
        "format": rp.FORMAT,
        "mode": MODE,
        "created_at": now(),
        "fingerprint": fingerprint,
        "benchmarks": benchmarks,
        "decoding": {
            "temperature": cfg.temperature,
            "top_p": cfg.top_p,
            "num_samples": cfg.num_samples,
            "seed": cfg.seed,
            "max_new_tokens": decoding.max_new_tokens,
            "stop": list(decoding.stop),
            "source": decoding.source,
        },
        "length_unit": length_unit,
        "timing": {role: t.record() for role, t in timings.items()},
        "wall_seconds": round(time.monotonic() - started, 3),
        "versions": {**library_versions("transformers", "torch"), **versions},
        "config": redact(cfg.to_yaml_dict()),
    }


def example_rows(
    loaded: list[Loaded], graded: dict[str, list[list[list[Graded]]]]
) -> list[dict[str, Any]]:
    """One row per problem: its prompt and gold answer, and each model's samples with verdicts."""
    rows = []
    for b, part in enumerate(loaded):
        for i, item in enumerate(part.items):
            row: dict[str, Any] = {
                "benchmark": part.task.name,
                "id": item.id,
                "row": item.row,
                "prompt": item.prompt,
                "gold": item.gold,
            }
            for role, per_benchmark in graded.items():
                samples = per_benchmark[b][i]
                correct = sum(g.correct for g in samples)
                row[role] = {
                    "correct": correct,
                    "pass@1": correct / len(samples),
                    "samples": [g.as_row() for g in samples],
                }
            rows.append(row)
    return rows


# --- the table ---------------------------------------------------------------------------


def _pct(value: float) -> str:
    return f"{100 * value:.1f} %"


def table_rows(benchmark: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(roles shown, rows of [label, value per role, gain]) for one benchmark."""
    models = benchmark["models"]
    roles = [r for r in ROLES if r in models]
    metrics = {r: models[r]["metrics"] for r in roles}
    first = metrics[roles[0]]
    n = first["samples"]
    gains = benchmark.get("gain", {})
    rows = []
    for k in m.pass_ks(n):
        key = f"pass@{k}"
        if k == 1:
            label = "final-answer accuracy" if n == 1 else f"pass@1 (mean of {n} samples)"
        else:
            label = f"pass@{k}"
        values = []
        for r in roles:
            text = _pct(metrics[r][key])
            err = metrics[r].get("pass@1_stderr") if k == 1 else None
            values.append(text + (f" ± {100 * err:.1f}" if err is not None else ""))
        shown_gain = f"{100 * gains[key]:+.1f} pts" if key in gains else ""
        rows.append([label, *values, shown_gain])
    plain = [
        ("stop_rate", "stop rate (ended with EOS)", _pct),
        ("mean_tokens", "mean answer tokens", lambda v: f"{v:,.1f}"),
        ("no_answer", "answers with no final answer", _pct),
        ("failed", "failed requests", lambda v: f"{int(v):,}"),
    ]
    for key, label, fmt in plain:
        values = [metrics[r].get(key) for r in roles]
        if key == "failed" and not any(values):
            continue
        rows.append([label, *["-" if v is None else fmt(v) for v in values], ""])
    return roles, rows


def print_table(report: dict[str, Any]) -> None:
    from rich.table import Table

    from openkd import console

    decoding = report["decoding"]
    if decoding["temperature"] == 0:
        how = "greedy"
    else:
        how = f"temperature {decoding['temperature']:g}, top-p {decoding['top_p']:g}"
    how += f", {decoding['num_samples']} sample{'s' if decoding['num_samples'] > 1 else ''}"
    for bench in report["benchmarks"]:
        roles, rows = table_rows(bench)
        models = bench["models"]
        title = f"openkd eval: {bench['name']}, {bench['problems']:,} problems ({how})"
        if bench.get("rows_without_gold"):
            title += f", {bench['rows_without_gold']:,} more without a gold answer, not scored"
        if bench.get("decontaminated"):
            title += f"; {bench['decontaminated']}"
        table = Table(title=title, title_justify="left")
        table.add_column("metric", style="bold", no_wrap=True)
        for role in roles:
            header = f"{role}\n{rp.short_name(models[role]['name'])}"
            table.add_column(header, justify="right", overflow="fold")
        show_gain = "gain" in bench
        if show_gain:
            table.add_column("gain\nstudent - base", justify="right")
        for row in rows:
            table.add_row(*(row if show_gain else row[:-1]))
        console.console.print(table)
