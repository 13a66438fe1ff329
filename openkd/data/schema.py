"""The one record format: what `openkd generate` writes and `openkd train` reads as is.

A row is TRL's conversational prompt/completion format plus provenance:

    {"id": "…", "prompt": [{"role": "user", "content": "…"}],
     "completion": [{"role": "assistant", "content": "…"}],
     "finish_reason": "stop", "prompt_tokens": 12, "completion_tokens": 40, "source_index": 7}

`LabelledRow` types it (with the keys some runs add), `FailureRow` a prompt the teacher failed
on (`<stem>.failed.jsonl`). TypedDicts: checked by mypy, plain dicts at run time.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, NotRequired, TypedDict

REQUIRED_COLUMNS = ("id", "prompt", "completion", "finish_reason")
FINISH_STOP = "stop"
FINISH_LENGTH = "length"


class Message(TypedDict):
    role: str
    content: str


class Verification(TypedDict):
    """--verify's verdict on a row (`openkd.verify.verdict.Verdict`)."""

    correct: bool
    answer: str | None  # what was extracted from the answer and compared
    gold: str | None
    method: str  # "math" or "exact"
    reason: str | None  # why it was not accepted; None when correct


class LabelledRow(TypedDict):
    """A row of the train, eval, truncated or rejected file."""

    id: str
    prompt: list[Message]
    completion: list[Message]  # one assistant message
    finish_reason: str  # FINISH_LENGTH: cut at --max-new-tokens
    prompt_tokens: int
    completion_tokens: int
    source_index: int  # the prompt's row in the source dataset
    sample: NotRequired[int]  # --num-samples: which answer to the prompt
    prompt_id: NotRequired[str]  # --num-samples: shared by a prompt's answers
    answer: NotRequired[str | None]  # --verify: the gold answer
    verification: NotRequired[Verification]  # --verify, on complete answers


class FailureRow(TypedDict):
    """A prompt the teacher failed on (retried by the next run)."""

    id: str
    prompt: list[Message]
    source_index: int
    error: str


def record_id(
    prompt: list[Message], teacher: str, sampling: dict[str, Any], sample: int = 0
) -> str:
    """Stable id of (prompt messages, teacher, sampling settings, sample number): same inputs,
    same id. Sample 0 leaves the number out, so a single answer's id is the same either way."""
    extra = {"sample": sample} if sample else {}
    payload = json.dumps(
        {"prompt": prompt, "teacher": teacher, "sampling": sampling, **extra},
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]


def make_record(
    *,
    id: str,
    prompt: list[Message],
    text: str,
    finish_reason: str,
    prompt_tokens: int,
    completion_tokens: int,
    source_index: int,
) -> LabelledRow:
    """A row in the format above (the keys in that order)."""
    return {
        "id": id,
        "prompt": prompt,
        "completion": [Message(role="assistant", content=text)],
        "finish_reason": finish_reason,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "source_index": source_index,
    }


def is_complete(record: LabelledRow) -> bool:
    """True when the teacher finished its answer: not cut at the token limit and not empty."""
    text = record["completion"][0]["content"] if record.get("completion") else ""
    return record.get("finish_reason") != FINISH_LENGTH and bool(text.strip())
