"""What an earlier run left: ids already labelled, their counts, and the prompts that failed.

Reading the files also repairs them: a last line torn by a kill is cut away first, so the
next append starts on a clean line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from openkd.data.jsonl import iter_jsonl, repair_torn_tail
from openkd.errors import OpenkdError
from openkd.generate.metadata import tally
from openkd.generate.outputs import OutputFiles


@dataclass
class ResumeState:
    done: set[str] = field(default_factory=set)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    failed: dict[str, dict[str, Any]] = field(default_factory=dict)
    repaired: list[tuple[Path, int]] = field(default_factory=list)

    @property
    def has_rows(self) -> bool:
        return bool(self.done)


def _scan(path: Path, done: set[str]) -> dict[str, int]:
    counts = tally()
    if not path.is_file():
        return counts
    for lineno, row in iter_jsonl(path):
        rid = row.get("id")
        if not isinstance(rid, str):
            raise OpenkdError(
                f"{path}:{lineno}: row has no 'id'; this is not an openkd output, "
                "pass --overwrite or another --output"
            )
        if rid in done:
            continue
        done.add(rid)
        counts["rows"] += 1
        counts["prompt_tokens"] += int(row.get("prompt_tokens") or 0)
        counts["completion_tokens"] += int(row.get("completion_tokens") or 0)
    return counts


def load_state(files: OutputFiles) -> ResumeState:
    state = ResumeState()
    for path in (*files.row_files, files.failed):
        cut = repair_torn_tail(path)
        if cut:
            state.repaired.append((path, cut))
    for kind, path in zip(("train", "eval", "truncated"), files.row_files, strict=True):
        state.counts[kind] = _scan(path, state.done)
    if files.failed.is_file():
        for _, row in iter_jsonl(files.failed):
            rid = row.get("id")
            if isinstance(rid, str) and rid not in state.done:
                state.failed[rid] = row
    return state
