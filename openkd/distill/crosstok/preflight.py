"""Before training across tokenizers: which method applies, and how much of the answer it covers.

Coverage is the share of the student's answer tokens (its end-of-turn token included) that get
a teacher target, exact, merged or ULD, measured on the first rows. Below
`MIN_COVERAGE` (half) training stops: most answer tokens would train on their hard label alone,
so `--loss mix` would be `--loss hard` plus a KL on a biased minority (the tokens both
tokenizers happen to split alike), and its reported KL and agreement would describe that
minority, not the answer. In practice coverage that low means the teacher's tokenizer is not
the one that wrote the ids (another revision: its ids do not spell the dataset's answers) or the
student's tokenizer normalises the text; a related pair (same family) aligns almost every token.
`--cross-tokenizer-min-coverage 0` trains anyway.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from openkd.distill.crosstok.aligner import Aligner
from openkd.distill.crosstok.vocab import bytes_index, exact_map, is_byte_level, token_bytes
from openkd.errors import OpenkdError

MIN_COVERAGE = 0.5
KIND_NAMES = ("exact", "merged", "uld")


@dataclass
class Coverage:
    """Counts of student answer positions per target kind, over the rows measured."""

    method: str
    rows: int = 0
    counts: Counter[str] = field(default_factory=Counter)
    problems: Counter[str] = field(default_factory=Counter)

    @property
    def positions(self) -> int:
        return int(self.counts["positions"])

    def share(self, kind: str) -> float:
        return self.counts[kind] / self.positions if self.positions else 0.0

    @property
    def covered(self) -> float:
        return sum(self.share(k) for k in KIND_NAMES)

    def describe(self) -> str:
        parts = ", ".join(f"{k} {self.share(k):.1%}" for k in KIND_NAMES)
        return (
            f"{self.covered:.1%} of {self.positions:,} answer tokens of the first {self.rows} "
            f"rows get a teacher target ({parts})"
        )

    def record(self) -> dict[str, Any]:
        """For openkd_run.json and the card."""
        return {
            "method": self.method,
            "rows": self.rows,
            "positions": self.positions,
            "coverage": round(self.covered, 4),
            **{k: round(self.share(k), 4) for k in KIND_NAMES},
        }


def measure(aligner: Aligner, rows: Iterable[tuple[Any, str | None]], method: str) -> Coverage:
    """Align (sidecar row, answer text) pairs and count their target kinds."""
    coverage = Coverage(method=method)
    for stored, answer in rows:
        aligned = aligner.align(stored.token_ids, stored.top_ids, stored.top_logprobs, answer)
        coverage.rows += 1
        coverage.counts.update(aligned.counts())
        if aligned.problem:
            coverage.problems[aligned.problem] += 1
    return coverage


def check(coverage: Coverage, minimum: float, teacher: str) -> None:
    """Raise when coverage is below `minimum` (one line naming the cause and the way out)."""
    if coverage.positions == 0 or coverage.covered >= minimum:
        return
    why = ""
    if coverage.problems:
        problem, count = coverage.problems.most_common(1)[0]
        why = f"; in {count} of {coverage.rows} rows {problem} (is {teacher} the tokenizer that wrote them?)"
    raise OpenkdError(
        f"across tokenizers only {coverage.describe()}, below {minimum:.0%}{why}; pass "
        "--cross-tokenizer-min-coverage 0 to train anyway, or use --loss hard"
    )


def cross_lines(
    teacher_tokenizer: Any, student_tokenizer: Any, method: str, cross: str, teacher: str
) -> list[str]:
    """What the pre-flight says of two vocabularies: sizes, shared tokens, the method."""
    shared = exact_map(token_bytes(teacher_tokenizer), bytes_index(token_bytes(student_tokenizer)))
    share = float((shared >= 0).mean()) if len(shared) else 0.0
    byte_level = is_byte_level(teacher_tokenizer) and is_byte_level(student_tokenizer)
    how = (
        "GOLD: JSD over the tokens both vocabularies share, ULD over the rest"
        if method == "gold"
        else "ULD: sorted-probability L1 over the whole vocabularies"
    )
    return [
        f"the teacher's tokenizer ({teacher}, {len(teacher_tokenizer):,} tokens) differs from "
        f"the student's ({len(student_tokenizer):,}); {share:.0%} of the teacher's tokens are a "
        "student token",
        f"cross-tokenizer on-policy ({method}, --cross-tokenizer {cross}): TRL's GOLD trainer "
        "re-tokenises each sample for the teacher and aligns the two by the text they cover "
        f"({'byte offsets' if byte_level else 'positions: a tokenizer is not byte-level'}); "
        f"{how}",
    ]
