"""Group teacher and student tokens by the text they cover.

Both sides are byte spans over the same completion text. Walking both, the side whose current
token ends first advances; a group closes where both reach the same byte boundary, the points
where the two tokenizers agree on a split. This is TRL GOLD's `ULDLoss._align_by_byte_offsets`
(trl/experimental/gold/gold_trainer.py), on spans instead of tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

Span = tuple[int, int]
Group = tuple[list[int], list[int]]  # (teacher positions, student positions)


def spans(lengths: Sequence[int], start: int = 0) -> list[Span]:
    """Consecutive [start, end) byte spans of tokens of these byte lengths."""
    out: list[Span] = []
    for n in lengths:
        out.append((start, start + n))
        start += n
    return out


def groups(teacher: Sequence[Span], student: Sequence[Span]) -> list[Group]:
    """Aligned groups of (teacher positions, student positions); the unmatched tail last."""
    out: list[Group] = []
    t = s = t_start = s_start = 0
    while t < len(teacher) and s < len(student):
        t_end, s_end = teacher[t][1], student[s][1]
        if s_end < t_end:
            s += 1
        elif t_end < s_end:
            t += 1
        else:
            t += 1
            s += 1
            out.append((list(range(t_start, t)), list(range(s_start, s))))
            t_start, s_start = t, s
    if t_start < len(teacher) or s_start < len(student):
        out.append((list(range(t_start, len(teacher))), list(range(s_start, len(student)))))
    return out
