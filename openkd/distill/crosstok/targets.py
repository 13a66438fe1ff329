"""Each student position's target, from the teacher's stored top-K over an aligned group.

Three kinds (`KINDS`), chosen per group of tokens covering the same text (`align.groups`):

- **exact**: one teacher token and one student token cover the same bytes. The teacher's top-K
  ids are mapped to the student ids with the same bytes (GOLD's matched vocabulary, with the
  `Ġ`/`▁`/`<0x..>` conventions read as bytes); a top-K token the student lacks keeps its mass in
  the rest (tail) bucket, so the student is taught to leave that mass outside the mapped tokens
  rather than to put it on them.
- **merged**: the group splits differently (2:1, 1:3, ...). GOLD (TRL `ULDLoss.
  _merge_probabilities_with_alignment_groups`, "observed") multiplies the first position's
  distribution by the probabilities of the actual later tokens, on both sides, from full
  logits. Offline only the teacher's top-K exists, so the teacher's group is projected onto the
  student's positions by the chain rule instead: with A(j) the probability of the teacher's
  actual tokens up to the first teacher boundary at or past the end of student token j, the
  first student position gets the teacher's first-position alternatives, each on the student
  token that begins it (the longest student token its bytes start with), and A(first) on the
  student's actual token; each later position j gets its actual token with A(j) / A(j - 1)
  (the first one divided by the whole mass projected on the first token). What is left goes to
  the tail. Per student position this is a distribution over student tokens, so the loss stays
  the K + 1-bucket KL of `openkd.distill.kd`, computed per position: no cross-position terms.
- **uld**: no stored token maps (e.g. a special token, or `--cross-tokenizer uld`): the
  student's sorted probabilities are matched to the teacher's sorted top-K (ULD, Boizard et
  al. 2024: a Wasserstein-1 bound that needs no shared ids).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from openkd.distill.crosstok.align import Group, Span
from openkd.distill.crosstok.vocab import NO_ID

NONE, EXACT, MERGED, ULD = 0, 1, 2, 3
KINDS = {EXACT: "exact", MERGED: "merged", ULD: "uld"}


@dataclass
class Teacher:
    """One row's stored teacher data: completion ids [n], top-K ids and log-probs [n, K]."""

    ids: np.ndarray
    top_ids: np.ndarray
    top_logprobs: np.ndarray

    def prob_of_actual(self, i: int) -> float | None:
        """The teacher's probability of the token it wrote at i, if within its stored top-K."""
        hit = np.nonzero(self.top_ids[i] == self.ids[i])[0]
        return float(np.exp(self.top_logprobs[i, hit[0]])) if len(hit) else None


@dataclass
class Maps:
    """Teacher id -> student id: `exact` by identical bytes, `prefix` by the longest prefix."""

    exact: np.ndarray
    prefix: Callable[[int], int]


@dataclass
class Targets:
    """Per student completion position: ids and log-probs [m, K] (-inf pads), kind [m]."""

    ids: np.ndarray
    logprobs: np.ndarray
    kind: np.ndarray

    @classmethod
    def empty(cls, m: int, k: int) -> Targets:
        return cls(
            ids=np.zeros((m, k), dtype=np.int64),
            logprobs=np.full((m, k), -np.inf, dtype=np.float32),
            kind=np.zeros(m, dtype=np.int8),
        )

    def put(self, j: int, masses: dict[int, float], kind: int) -> None:
        """Student position j's target: probability per student id (at most K kept)."""
        items = sorted(((p, i) for i, p in masses.items() if p > 0), reverse=True)
        items = items[: self.ids.shape[1]]
        for slot, (p, token) in enumerate(items):
            self.ids[j, slot] = token
            self.logprobs[j, slot] = math.log(min(p, 1.0))
        self.kind[j] = kind

    def put_uld(self, j: int, logprobs: np.ndarray) -> None:
        """Sorted teacher log-probabilities for ULD (their ids do not matter)."""
        self.logprobs[j] = np.sort(logprobs.astype(np.float32))[::-1]
        self.kind[j] = ULD


def exact_target(teacher: Teacher, i: int, student_id: int, maps: Maps) -> dict[int, float]:
    """The teacher's top-K at i on student ids of the same bytes; the actual token on `student_id`."""
    masses: dict[int, float] = {}
    for tid, lp in zip(teacher.top_ids[i], teacher.top_logprobs[i], strict=True):
        sid = student_id if tid == teacher.ids[i] else int(maps.exact[tid])
        if sid != NO_ID and np.isfinite(lp):
            masses[sid] = masses.get(sid, 0.0) + float(np.exp(lp))
    return masses


def merged_targets(
    teacher: Teacher,
    t_pos: Sequence[int],
    t_spans: Sequence[Span],
    s_pos: Sequence[int],
    s_spans: Sequence[Span],
    student_ids: Sequence[int],
    maps: Maps,
) -> list[dict[int, float]] | None:
    """Targets of a group's student positions by the chain rule (module docstring); None when
    an actual teacher token is outside its stored top-K (its probability is unknown)."""
    actual = [teacher.prob_of_actual(i) for i in t_pos]
    if any(p is None for p in actual):
        return None

    def path(end: int) -> float:  # P(the teacher's tokens up to the first boundary >= end)
        mass = 1.0
        for i, p in zip(t_pos, actual, strict=True):
            if t_spans[i][0] < end:
                mass *= p or 0.0
        return mass

    first = t_pos[0]
    head: dict[int, float] = {}
    for tid, lp in zip(teacher.top_ids[first], teacher.top_logprobs[first], strict=True):
        if tid == teacher.ids[first] or not np.isfinite(lp):
            continue
        sid = maps.prefix(int(tid))
        if sid != NO_ID:
            head[sid] = head.get(sid, 0.0) + float(np.exp(lp))
    lead = student_ids[s_pos[0]]
    head[lead] = head.get(lead, 0.0) + path(s_spans[s_pos[0]][1])
    out = [head]
    previous = head[lead]
    for j in s_pos[1:]:
        current = path(s_spans[j][1])
        out.append({student_ids[j]: min(1.0, current / previous) if previous > 0 else 0.0})
        previous = current
    return out


def build_targets(
    method: str,
    groups: Sequence[Group],
    teacher: Teacher,
    t_spans: Sequence[Span],
    student_ids: Sequence[int],
    s_spans: Sequence[Span],
    maps: Maps,
    k: int,
) -> Targets:
    """Targets for the student's text positions (method "gold" or "uld"); see the docstring."""
    out = Targets.empty(len(student_ids), k)
    for t_pos, s_pos in groups:
        if not t_pos or not s_pos:
            continue
        if method == "uld":
            out.put_uld(s_pos[0], teacher.top_logprobs[t_pos[0]])
            continue
        if len(t_pos) == 1 and len(s_pos) == 1:
            masses = exact_target(teacher, t_pos[0], student_ids[s_pos[0]], maps)
            if masses:
                out.put(s_pos[0], masses, EXACT)
            else:
                out.put_uld(s_pos[0], teacher.top_logprobs[t_pos[0]])
            continue
        merged = merged_targets(teacher, t_pos, t_spans, s_pos, s_spans, student_ids, maps)
        if merged is None:
            out.put_uld(s_pos[0], teacher.top_logprobs[t_pos[0]])
            continue
        for j, masses in zip(s_pos, merged, strict=True):
            out.put(j, masses, MERGED)
    return out
