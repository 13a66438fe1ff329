"""Whether a teacher's tokenizer gives every token the student's id: what stored top-k ids (and
a teacher scoring the student's tokens) need. Shared by `openkd train` and `openkd eval`.
"""

from __future__ import annotations

from typing import Any

from openkd.errors import OpenkdError


def vocab_mismatch(
    teacher_vocab: dict[str, int], student_vocab: dict[str, int]
) -> list[tuple[str, int, int | None]]:
    """Teacher tokens the student maps to another id or not at all: (token, teacher, student)."""
    return [
        (token, index, student_vocab.get(token))
        for token, index in teacher_vocab.items()
        if student_vocab.get(token) != index
    ]


def check_tokenizers(
    student_tokenizer: Any,
    teacher: str | None,
    *,
    trust_remote_code: bool,
    revision: str | None = None,
    cross: str = "off",
) -> tuple[str | None, str | None, Any]:
    """(a ✓ line, a warning, the teacher's tokenizer when it differs from the student's).

    The teacher's tokenizer maps every token as the student's does, or (`cross` not "off") the
    tokenizer is returned for alignment. Raises on a mismatch with `cross` "off". Returns a
    warning instead when the teacher's tokenizer cannot be loaded (no teacher named, an
    offline Hub id, a mock teacher).
    """
    if not teacher:
        return (
            None,
            "the dataset's metadata names no teacher, so its tokenizer is not compared",
            None,
        )
    try:
        from transformers import AutoTokenizer

        teacher_tokenizer = AutoTokenizer.from_pretrained(
            teacher, trust_remote_code=trust_remote_code, revision=revision
        )
    except Exception as exc:  # offline, gated, not a model (mock teachers)...
        text = " ".join(str(exc).split())[:160] or type(exc).__name__
        return None, f"could not load the teacher's tokenizer {teacher} ({text})", None
    teacher_vocab = teacher_tokenizer.get_vocab()
    wrong = vocab_mismatch(teacher_vocab, student_tokenizer.get_vocab())
    if wrong and cross != "off":
        line = (
            f"the teacher's tokenizer ({teacher}) differs from the student's: {len(wrong):,} of "
            f"its {len(teacher_vocab):,} tokens have another id or none"
        )
        return line, None, teacher_tokenizer
    if wrong:
        token, t_id, s_id = wrong[0]
        theirs = "is missing" if s_id is None else f"is id {s_id}"
        raise OpenkdError(
            f"the teacher {teacher} and the student tokenize differently: {len(wrong):,} of the "
            f"teacher's {len(teacher_vocab):,} tokens have another id in the student (e.g. "
            f"{token!r} is id {t_id} in the teacher and {theirs} in the student), so the "
            f"teacher's top-k log-probabilities would name the wrong tokens; drop "
            f"--cross-tokenizer off to align them by text, or use --loss hard"
        )
    return (
        f"the teacher's tokenizer ({teacher}) maps all its {len(teacher_vocab):,} tokens to the "
        "student's ids",
        None,
        None,
    )
