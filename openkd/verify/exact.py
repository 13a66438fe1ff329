"""Exact verification for tasks whose answers are words or labels, not math."""

from __future__ import annotations

import re

from openkd.verify.extract import extract_answer, same_answer
from openkd.verify.verdict import Verdict, shown


def verify_exact(answer_text: str, gold: str, pattern: re.Pattern[str] | None = None) -> Verdict:
    """Extract the final answer (`pattern`'s group 1 or whole match; default the last
    `\\boxed{...}`) and compare it with `gold` after normalisation."""
    found = extract_answer(answer_text, pattern)
    if found is None:
        what = f"no match of --answer-regex {pattern.pattern!r}" if pattern else "no \\boxed{...}"
        return Verdict(False, None, shown(gold), "exact", f"no final answer found ({what})")
    if same_answer(found, gold):
        return Verdict(True, shown(found), shown(gold), "exact")
    return Verdict(False, shown(found), shown(gold), "exact", "answer differs from gold")
