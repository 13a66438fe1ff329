"""One row of the sidecar on the student's tokens: text, student ids, targets and coverage.

The teacher's completion ids are read as bytes with the teacher's tokenizer (`vocab`), the text
they spell is tokenised by the student, both sides are grouped by span (`align`) and each
student position gets its target (`targets`). A row whose ids do not spell the dataset's answer
(another tokenizer or revision than the teacher's), or whose text the student's tokenizer does
not reproduce byte for byte (a normaliser), trains on its hard labels alone and counts as
uncovered.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from openkd.distill.crosstok import align, targets, vocab
from openkd.distill.crosstok.targets import EXACT, KINDS, Targets, Teacher


@dataclass
class Aligned:
    """A row on the student's tokens: completion ids (EOS not included) and their targets.

    `targets` has one more position than `student_ids`: the student's end-of-turn token, whose
    target is the teacher's last position when the teacher ended on a special token.
    """

    student_ids: list[int]
    targets: Targets
    problem: str | None = None  # why the row has no targets

    def counts(self) -> Counter[str]:
        found = Counter(KINDS.get(int(k), "none") for k in self.targets.kind)
        found["positions"] = len(self.targets.kind)
        return found


def _text(raw: bytes) -> str | None:
    """`raw` as UTF-8, a character cut at the end (a token limit) dropped; None if invalid."""
    for cut in range(4):
        try:
            return raw[: len(raw) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
    return None


@dataclass
class Aligner:
    """The teacher's and student's tokenizers, compared once; `align` rows with them."""

    teacher_tokenizer: Any
    student_tokenizer: Any
    method: str  # "gold" or "uld"
    student_eos: int
    _state: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:  # tables are rebuilt, not pickled or hashed
        return {k: v for k, v in self.__dict__.items() if k != "_state"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _state={})

    def _tables(self) -> dict[str, Any]:
        if not self._state:
            teacher = vocab.token_bytes(self.teacher_tokenizer)
            student = vocab.token_bytes(self.student_tokenizer)
            index = vocab.bytes_index(student)
            self._state.update(
                teacher=teacher,
                student=student,
                index=index,
                longest=max((len(b) for b in index), default=0),
                exact=vocab.exact_map(teacher, index),
                prefix={},
            )
        return self._state

    def prefix(self, teacher_id: int) -> int:
        """The student token that begins teacher token `teacher_id`'s bytes (memoised)."""
        tables = self._tables()
        memo: dict[int, int] = tables["prefix"]
        if teacher_id not in memo:
            value = tables["teacher"][teacher_id] if teacher_id < len(tables["teacher"]) else None
            memo[teacher_id] = (
                vocab.NO_ID
                if not value
                else vocab.longest_prefix(value, tables["index"], tables["longest"])
            )
        return memo[teacher_id]

    def shared_vocabulary(self) -> float:
        """Share of the teacher's text tokens with a student token of the same bytes."""
        tables = self._tables()
        text = [i for i, b in enumerate(tables["teacher"]) if b is not None]
        return float(np.mean(tables["exact"][text] != vocab.NO_ID)) if text else 0.0

    def _student(self, text: str) -> list[int]:
        return list(self.student_tokenizer(text, add_special_tokens=False)["input_ids"])

    def align(
        self,
        ids: np.ndarray,
        top_ids: np.ndarray,
        top_logprobs: np.ndarray,
        answer: str | None = None,
    ) -> Aligned:
        """Row `ids` (the teacher's completion) with its top-K [n, K], on the student's tokens.

        `answer`: the dataset's answer text; when the ids do not spell it, the row is trained
        on the student's tokens of `answer` with no targets.
        """
        tables = self._tables()
        k = int(top_ids.shape[1]) if top_ids.ndim == 2 else 0
        teacher_bytes: list[bytes | None] = tables["teacher"]
        ids = np.asarray(ids, dtype=np.int64)
        text_pos = [i for i, t in enumerate(ids) if t < len(teacher_bytes) and teacher_bytes[t]]
        pieces = [teacher_bytes[int(ids[i])] or b"" for i in text_pos]
        text = _text(b"".join(pieces))

        def unaligned(problem: str) -> Aligned:
            fallback = answer if answer is not None else (text or "")
            student_ids = self._student(fallback)
            return Aligned(student_ids, Targets.empty(len(student_ids) + 1, k), problem)

        if text is None:
            return unaligned("the teacher's ids do not decode to UTF-8 text")
        if answer is not None and text.strip() != answer.strip():
            return unaligned("the teacher's ids do not spell the dataset's answer")
        student_ids = self._student(text)
        student_pieces = [tables["student"][t] or b"" for t in student_ids]
        encoded = text.encode("utf-8")
        joined = b"".join(student_pieces)
        lengths = [len(p) for p in student_pieces]
        if joined != encoded:
            if joined == b" " + encoded and lengths and lengths[0] >= 1:
                lengths[0] -= 1  # SentencePiece's prefix space: not part of the text
            else:
                return unaligned("the student's tokenizer changes the answer's text")
        # A first token left with no text (SentencePiece's lone `▁`) is certain: the
        # tokenizer always writes it. The rest aligns without it.
        skip = 1 if lengths and lengths[0] == 0 else 0
        t_spans = align.spans([len(p) for p in pieces])
        s_spans = align.spans(lengths[skip:])
        teacher = Teacher(ids[text_pos], top_ids[text_pos], top_logprobs[text_pos])
        maps = targets.Maps(exact=tables["exact"], prefix=self.prefix)
        body = targets.build_targets(
            self.method, align.groups(t_spans, s_spans), teacher, t_spans, student_ids[skip:],
            s_spans, maps, k,
        )  # fmt: skip
        out = Targets.empty(len(student_ids) + 1, k)
        out.ids[skip:-1], out.logprobs[skip:-1], out.kind[skip:-1] = (
            body.ids,
            body.logprobs,
            body.kind,
        )
        if skip:
            out.put(0, {student_ids[0]: 1.0}, targets.MERGED)
        last = len(ids) - 1
        if last >= 0 and (last not in text_pos) and (not text_pos or text_pos[-1] < last):
            # The teacher ended on a special token (its end of turn): the student's EOS.
            end = Teacher(ids[last:], top_ids[last:], top_logprobs[last:])
            if self.method == "uld":
                out.put_uld(len(student_ids), top_logprobs[last])
            else:
                masses = targets.exact_target(end, 0, self.student_eos, maps)
                if masses:
                    out.put(len(student_ids), masses, EXACT)
        return Aligned(student_ids, out)
