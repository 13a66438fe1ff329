"""Measure L_T: the teacher's own NLL of its held-out answers, as eval measures the student's.

The text is what the student was scored on: the prompts and teacher answers of an eval's
examples.jsonl, or of a held-out JSONL `openkd generate` wrote (prompt + completion columns).
Scoring is openkd eval's (`openkd.eval.nll`): answer tokens only, teacher-forced, in the
teacher's own tokens, so L_T and L_S are comparable when teacher and student share a tokenizer.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from openkd import console
from openkd.errors import OpenkdError
from openkd.plan.pilots import Pilot


def _text(value: Any) -> str | None:
    """An answer as text: a string, or the content of a one-message list."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and isinstance(value[-1], dict):
        content = value[-1].get("content")
        return content if isinstance(content, str) else None
    return None


def _prompt(value: Any) -> list[dict[str, str]] | None:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and all(isinstance(m, dict) for m in value):
        return value
    return None


def read_pairs(path: Path) -> list[tuple[list[dict[str, str]], str]]:
    """(prompt messages, teacher answer) of an eval examples.jsonl or a generate output."""
    pairs = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise OpenkdError(
            f"{path} is unreadable ({err}); pass held-out rows with prompts and teacher answers"
        ) from err
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise OpenkdError(f"{path}:{number}: not a JSON object ({err.msg})") from err
        teacher = row.get("teacher") if isinstance(row, dict) else None
        answer = (
            _text(teacher.get("text"))
            if isinstance(teacher, dict)
            else _text(row.get("completion"))
        )
        prompt = _prompt(row.get("prompt"))
        if prompt is None or answer is None:
            raise OpenkdError(
                f"{path}:{number}: expected a prompt and the teacher's answer (an eval "
                "examples.jsonl, or generate output with prompt and completion)"
            )
        if answer:
            pairs.append((prompt, answer))
    if not pairs:
        raise OpenkdError(f"{path} holds no teacher answers to score")
    return pairs


def teacher_loss(
    model: str,
    pairs: list[tuple[list[dict[str, str]], str]],
    *,
    batch_size: int = 8,
    max_length: int = 4096,
) -> float:
    """Mean NLL (nats per answer token) of the answers under `model`, transformers on CPU/GPU."""
    from openkd.eval.nll import score_answers
    from openkd.generate.backends.transformers import load_causal_lm
    from openkd.system import free_memory

    loaded, tokenizer = load_causal_lm(model)
    try:
        scores = score_answers(
            loaded,
            tokenizer,
            pairs,  # type: ignore[arg-type]
            batch_size=batch_size,
            max_length=max_length,
        )
    finally:
        del loaded
        free_memory()
    tokens = sum(s.tokens for s in scores)
    if not tokens:
        raise OpenkdError(
            f"no answer token of the held-out rows fits {max_length} tokens under {model}"
        )
    return sum(s.nll for s in scores) / tokens


def _key(pairs: list[tuple[list[dict[str, str]], str]]) -> str:
    return hashlib.sha256(json.dumps(pairs, sort_keys=True).encode()).hexdigest()


def measure_pilots(pilots: list[Pilot], model: str) -> list[Pilot]:
    """Every pilot without L_T gets the teacher's NLL of its own held-out answers (once per
    distinct held-out set)."""
    cache: dict[str, float] = {}
    out = []
    for p in pilots:
        if p.lt is not None:
            out.append(p)
            continue
        if p.examples is None:
            raise OpenkdError(
                f"pilot {p.name} has no eval examples.jsonl to measure the teacher on; pass "
                "--teacher-loss VALUE instead"
            )
        pairs = read_pairs(p.examples)
        key = _key(pairs)
        if key not in cache:
            console.info(f"measuring L_T: {model} on {len(pairs):,} held-out answers of {p.name}")
            cache[key] = teacher_loss(model, pairs)
        out.append(replace(p, lt=cache[key]))
    return out
