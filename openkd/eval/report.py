"""Scores per example and per model, the terminal table, report.json and examples.jsonl.

report.json is written last, atomically, and carries a fingerprint of every input (config,
dataset bytes, model files), so an unchanged rerun can reuse it instead of recomputing.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from openkd import __version__
from openkd.data.jsonl import write_jsonl_atomic, write_text_atomic
from openkd.data.metadata import now, redact
from openkd.data.schema import FINISH_STOP
from openkd.eval import metrics as m
from openkd.eval.nll import perplexity
from openkd.system import library_versions
from openkd.verify import Verifier, make_verifier

if TYPE_CHECKING:
    from openkd.eval.config import EvalConfig
    from openkd.eval.examples import Decoding, Example

FORMAT = "openkd.eval/1"
SCORING = "openkd.verify/1"
# How agreement is scored: version 2 leaves out rows without a reference (reports of 1 are
# recomputed, not reused).
AGREEMENT = "openkd.eval.agreement/2"
REPORT = "report.json"
EXAMPLES = "examples.jsonl"
ROLES = ("teacher", "student", "base")
CONTENT_HASH_LIMIT = 1 << 30
MODEL_FILES = (".json", ".safetensors", ".bin", ".model", ".txt", ".jinja", ".py", ".tiktoken")
# Written beside a trained model by the trainer, but not part of what answers.
NOT_MODEL_FILES = {
    "trainer_state.json",
    "training_args.bin",
    "openkd_run.json",
    "all_results.json",
    "train_results.json",
    "eval_results.json",
}


@dataclass(frozen=True)
class Answer:
    """One model's answer to one prompt; `tokens` is its length in the scoring tokenizer."""

    text: str
    finish_reason: str
    tokens: int
    error: str | None = None


def pair_scores(answer: Answer, reference: Answer) -> dict[str, float]:
    """Agreement of one answer with the teacher's answer to the same prompt."""
    return {
        "exact_match": m.exact_match(answer.text, reference.text),
        "token_f1": m.token_f1(answer.text, reference.text),
        "rouge_l": m.rouge_l(answer.text, reference.text),
        "length_ratio": m.length_ratio(answer.tokens, reference.tokens),
    }


def task_correct(text: str, gold: str | None, pattern: str | None) -> bool | None:
    """Whether `text`'s final answer is the gold answer (None without one): math-verify
    equivalence by default (`\\frac{1}{2}` = `0.5`), exact text with --answer-regex."""
    if gold is None:
        return None
    return _verifier(pattern)(text, gold).correct


@functools.cache
def _verifier(pattern: str | None) -> Verifier:
    return make_verifier("exact" if pattern else "math", pattern)


def summarize(
    answers: list[Answer],
    references: list[Answer] | None,
    gold: list[str | None],
    pattern: str | None,
    nll: tuple[float, int] | None,
) -> dict[str, Any]:
    """Mean metrics of one model over all examples (agreement only when references are given)."""
    ok = [a for a in answers if a.error is None]
    out: dict[str, Any] = {
        "rows": len(answers),
        "failed": len(answers) - len(ok),
        "stop_rate": m.mean([a.finish_reason == FINISH_STOP for a in answers]),
        "mean_tokens": m.mean([a.tokens for a in ok]),
    }
    if references is not None:
        scored = [pair_scores(a, r) for a, r in zip(answers, references, strict=True)]
        for key in ("exact_match", "token_f1", "rouge_l"):
            out[key] = m.mean([s[key] for s in scored])
        with_length = [s for s, r in zip(scored, references, strict=True) if r.tokens > 0]
        out["length_ratio"] = m.mean([s["length_ratio"] for s in with_length])
    verdicts = [task_correct(a.text, g, pattern) for a, g in zip(answers, gold, strict=True)]
    graded = [v for v in verdicts if v is not None]
    if graded:
        out["task_accuracy"] = m.mean(graded)
        out["task_rows"] = len(graded)
    if nll is not None:
        total, tokens = nll
        mean_nll = total / tokens if tokens else None
        out["nll"] = mean_nll
        out["perplexity"] = perplexity(mean_nll)
        out["nll_tokens"] = tokens
    return out


def teacher_summary(
    references: list[Answer],
    finishes: list[str | None],
    gold: list[str | None],
    pattern: str | None,
) -> dict[str, Any]:
    """What can be said of the teacher itself: its stop rate, length and task accuracy."""
    out: dict[str, Any] = {
        "rows": len(references),
        "mean_tokens": m.mean([r.tokens for r in references]),
    }
    known = [f for f in finishes if f is not None]
    if known:
        out["stop_rate"] = m.mean([f == FINISH_STOP for f in known])
    verdicts = [task_correct(r.text, g, pattern) for r, g in zip(references, gold, strict=True)]
    graded = [v for v in verdicts if v is not None]
    if graded:
        out["task_accuracy"] = m.mean(graded)
        out["task_rows"] = len(graded)
    return out


# --- fingerprints -------------------------------------------------------------------------


def _hash_file(path: Path, digest: Any) -> None:
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)


def dataset_fingerprint(spec: str) -> str:
    """sha256 of a local dataset's bytes (all files of a directory), or the id for the Hub."""
    path = Path(os.path.expanduser(spec))
    digest = hashlib.sha256()
    if path.is_file():
        _hash_file(path, digest)
    elif path.is_dir():
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(str(f.relative_to(path)).encode())
            _hash_file(f, digest)
    else:
        digest.update(f"hub:{spec}".encode())
    return digest.hexdigest()


def model_fingerprint(spec: str | None) -> str | None:
    """A local model's top-level files (checkpoint folders are not the model), or the id of a Hub
    model. Small models are hashed by content, so re-saving identical weights keeps the
    fingerprint; large ones by name, size and mtime, which costs nothing for 100 GB."""
    if spec is None:
        return None
    path = Path(os.path.expanduser(spec))
    if not path.is_dir():
        return f"hub:{spec}"
    files = sorted(
        f
        for f in path.iterdir()
        if f.is_file() and f.suffix in MODEL_FILES and f.name not in NOT_MODEL_FILES
    )
    by_content = sum(f.stat().st_size for f in files) <= CONTENT_HASH_LIMIT
    digest = hashlib.sha256()
    for f in files:
        if by_content:
            digest.update(f"{f.name}\n".encode())
            _hash_file(f, digest)
        else:
            stat = f.stat()
            digest.update(f"{f.name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def inputs_fingerprint(
    config: dict[str, Any], dataset: str, models: Mapping[str, str | None]
) -> str:
    payload = {
        "openkd": __version__,
        # How final answers are scored: a report from an earlier scorer is not reused.
        "scoring": SCORING,
        "agreement": AGREEMENT,
        "config": {k: v for k, v in config.items() if k not in ("overwrite", "output_dir")},
        "dataset": dataset_fingerprint(dataset),
        "models": {role: model_fingerprint(spec) for role, spec in models.items()},
    }
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def read_report(path: Path) -> dict[str, Any] | None:
    """A previous report, or None if missing or unreadable (it is recomputed then)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) and data.get("format") == FORMAT else None


# --- output -------------------------------------------------------------------------------


def write_outputs(out_dir: Path, report: dict[str, Any], rows: Iterable[dict[str, Any]]) -> None:
    """examples.jsonl first, report.json last: a report on disk means a finished evaluation."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report_path = out_dir / REPORT
    if report_path.exists():
        report_path.unlink()
    write_jsonl_atomic(out_dir / EXAMPLES, rows)
    write_text_atomic(report_path, json.dumps(report, indent=2, ensure_ascii=False) + "\n")


def _pct(v: float) -> str:
    return f"{100 * v:.1f} %"


def _num(digits: int) -> Callable[[float], str]:
    return lambda v: f"{v:,.{digits}f}"


ROWS: tuple[tuple[str, str, Callable[[float], str]], ...] = (
    ("exact_match", "exact match with teacher", _pct),
    ("token_f1", "token F1", _pct),
    ("rouge_l", "ROUGE-L", _pct),
    ("length_ratio", "answer length / teacher's", _num(2)),
    ("stop_rate", "stop rate (ended with EOS)", _pct),
    ("mean_tokens", "mean answer tokens", _num(1)),
    ("nll", "NLL of teacher answers (nats/token)", _num(3)),
    ("perplexity", "perplexity of teacher answers", _num(2)),
    ("kl_to_teacher", "KL(teacher top-K || model) (nats/token)", _num(3)),
    ("kl_coverage", "answer tokens aligned for the KL (teacher's tokenizer differs)", _pct),
    ("top1_agreement", "top-1 agreement with the teacher", _pct),
    ("on_policy_reverse_kl", "reverse KL to teacher, own samples (nats/token)", _num(3)),
    (
        "on_policy_reverse_kl_top1_tail",
        "reverse KL to served teacher, own samples, top-1+tail estimate (nats/token)",
        _num(3),
    ),
    ("task_accuracy", "final-answer accuracy", _pct),
    ("nll_skipped", "prompts too long for --nll-max-length", lambda v: f"{int(v):,}"),
    ("failed", "failed requests", lambda v: f"{int(v):,}"),
)
# Counts shown only when some model has one.
SHOWN_IF_ANY = ("nll_skipped", "failed")


def short_name(name: str, width: int = 28) -> str:
    """A model name that fits a table column: the tail of a long path or id."""
    return name if len(name) <= width else "…" + name[-(width - 1) :]


def table_rows(models: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """(column headers, rows) of the comparison table; metrics nobody has are left out."""
    roles = [r for r in ROLES if r in models]
    headers = ["metric", *[f"{r}\n{short_name(models[r]['name'])}" for r in roles]]
    rows = []
    for key, label, fmt in ROWS:
        values = [models[r]["metrics"].get(key) for r in roles]
        if all(v is None for v in values):
            continue
        if key in SHOWN_IF_ANY and not any(values):
            continue
        rows.append([label, *["-" if v is None else fmt(v) for v in values]])
    return headers, rows


def print_table(report: dict[str, Any]) -> None:
    from rich.table import Table

    from openkd import console

    headers, rows = table_rows(report["models"])
    title = f"openkd eval: {report['rows']:,} held-out prompts from {report['dataset']}"
    if report.get("rows_without_reference"):
        title += f" ({report['rows_without_reference']:,} more without a reference, not scored)"
    table = Table(title=title, title_justify="left")
    table.add_column(headers[0], style="bold", no_wrap=True)
    for header in headers[1:]:
        table.add_column(header, justify="right", overflow="fold")
    for row in rows:
        table.add_row(*row)
    console.console.print(table)


# --- the report --------------------------------------------------------------------------


@dataclass
class Timing:
    """How long one model took: answering (and its tokens), and scoring likelihoods."""

    seconds: float = 0.0
    tokens: int = 0
    nll_seconds: float | None = None
    versions: dict[str, str] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """For report.json's `timing`."""
        return {
            "generate_seconds": round(self.seconds, 3),
            "completion_tokens": self.tokens,
            "completion_tokens_per_second": round(self.tokens / self.seconds, 3)
            if self.seconds > 0
            else None,
            "nll_seconds": None if self.nll_seconds is None else round(self.nll_seconds, 3),
        }


def build_report(
    cfg: EvalConfig,
    examples: list[Example],
    decoding: Decoding,
    summaries: dict[str, dict[str, Any]],
    timings: dict[str, Timing],
    length_unit: str,
    fingerprint: str,
    started: float,
) -> dict[str, Any]:
    versions: dict[str, str] = {}
    for t in timings.values():
        versions.update(t.versions)
    return {
        "format": FORMAT,
        "created_at": now(),
        "fingerprint": fingerprint,
        "dataset": cfg.dataset,
        "rows": len(examples),
        "decoding": {
            "temperature": 0.0,
            "max_new_tokens": decoding.max_new_tokens,
            "stop": list(decoding.stop),
            "source": decoding.source,
        },
        "length_unit": length_unit,
        "models": summaries,
        "timing": {role: t.record() for role, t in timings.items()},
        "wall_seconds": round(time.monotonic() - started, 3),
        "versions": {**library_versions("transformers", "torch"), **versions},
        "config": redact(cfg.to_yaml_dict()),
    }


def example_rows(
    examples: list[Example],
    references: list[Answer],
    ref_finish: list[str | None],
    answers: dict[str, list[Answer]],
    nll: dict[str, list[Any]],
    cfg: EvalConfig,
) -> list[dict[str, Any]]:
    rows = []
    for i, (ex, ref) in enumerate(zip(examples, references, strict=True)):
        row: dict[str, Any] = {
            "id": ex.id,
            "prompt": ex.prompt,
            "teacher": {"text": ref.text, "finish_reason": ref_finish[i], "tokens": ref.tokens},
        }
        if ex.gold is not None:
            row["gold"] = ex.gold
            row["teacher"]["correct"] = task_correct(ref.text, ex.gold, cfg.answer_regex)
        for role, model_answers in answers.items():
            a = model_answers[i]
            entry: dict[str, Any] = {
                "text": a.text,
                "finish_reason": a.finish_reason,
                "tokens": a.tokens,
                **pair_scores(a, ref),
            }
            if a.error:
                entry["error"] = a.error
            if role in nll:
                entry["nll"] = nll[role][i].mean
            if ex.gold is not None:
                entry["correct"] = task_correct(a.text, ex.gold, cfg.answer_regex)
            row[role] = entry
        rows.append(row)
    return rows
