"""The one result type of every verifier: was the answer right, what was compared, and why not."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from openkd.data.schema import Verification

Method = Literal["math", "exact"]
# Extracted answers are stored for people to read in side files and reports, not re-parsed.
SHOWN_CHARS = 200


def shown(text: str | None) -> str | None:
    """`text` clipped to a length fit for a report line."""
    if text is None:
        return None
    text = text.strip()
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 1] + "…"


@dataclass(frozen=True, slots=True)
class Verdict:
    """The verdict on one answer against its gold answer.

    `answer` and `gold` are what was extracted and compared (short strings; None when nothing
    could be extracted). `reason` is None when the answer is correct and otherwise says why it
    was not accepted: a wrong answer, nothing to extract, a timeout or an error.
    """

    correct: bool
    answer: str | None
    gold: str | None
    method: Method
    reason: str | None = None

    def to_dict(self) -> Verification:
        """The row's `verification` field (JSON-ready), e.g. for a rejected row's side file."""
        return Verification(
            correct=self.correct,
            answer=self.answer,
            gold=self.gold,
            method=self.method,
            reason=self.reason,
        )
