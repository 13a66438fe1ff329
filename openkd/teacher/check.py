"""The teacher before its weights load: where it is, whether it shares the student's
vocabulary, and what identifies it for the run record. Shared by `openkd train --loss
on-policy` and `openkd eval --on-policy-teacher`.

TRL's DistillationTrainer compares the two models' next-token distributions id by id: that
needs every token to have the same id in both tokenizers ("same"). Heads of different sizes
over one tokenizer (the embedding padding differs, e.g. Qwen2.5 7B and 0.5B) are fine: the
teacher's head is resized to the student's, which only touches rows no token uses. Teachers
with another vocabulary train with TRL's GOLD trainer (`openkd.train.onpolicy.gold`) unless
--cross-tokenizer off. Checked from the tokenizer and config files alone, before any weights load.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from openkd.errors import OpenkdError, brief
from openkd.paths import looks_like_path
from openkd.teacher.tokenizer import vocab_mismatch

CROSS_TOKENIZER = (
    "on-policy distillation with --cross-tokenizer off compares the two models' next-token "
    "distributions id by id, so they must share one vocabulary: pick a teacher of the student's "
    "family, or drop --cross-tokenizer off to align the two by text (TRL's GOLD trainer)"
)
ONE_VOCABULARY = (
    "the reverse KL compares the two models' next-token distributions id by id, so they must "
    "share one vocabulary and head size: pick a teacher of the student's family (training "
    "across tokenizers: `openkd train --loss on-policy`, --cross-tokenizer)"
)
SERVED_CROSS = (
    "a served teacher (--teacher-base-url, --teacher-serve) scores the student's own token ids, "
    "so it must share the student's vocabulary: load --teacher in the training process instead "
    "(drop the served-teacher flag) to distill across tokenizers with GOLD"
)
# Bytes hashed from the start of each weight file: enough to tell two checkpoints apart (the
# header names every tensor and its offsets) without reading a 100 GB teacher.
HEAD_BYTES = 1 << 20


@dataclass(frozen=True)
class Teacher:
    """A teacher checked against the student, ready for TRL to load."""

    name: str  # as the user gave it
    path: str  # absolute for a local directory, the id for a Hub model
    vocab_size: int  # the student's logits size
    identity: dict[str, Any] = field(default_factory=dict)
    # "same": one vocabulary (TRL DistillationTrainer); "gold" or "uld": another vocabulary,
    # aligned by text (TRL's GOLD trainer, `openkd.train.onpolicy.gold`)
    method: str = "same"
    teacher_vocab_size: int = 0  # the teacher's logits size (differs when padded differently)
    tokenizer_size: int = 0  # tokens in the teacher's tokenizer
    lines: list[str] = field(default_factory=list)


def resolve_teacher(teacher: str) -> str:
    """A local teacher as an absolute path (checked), a Hub id unchanged."""
    if not looks_like_path(teacher):
        return teacher
    path = Path(teacher).expanduser()
    if not (path / "config.json").is_file():
        what = "no such directory" if not path.exists() else "it has no config.json"
        raise OpenkdError(
            f"--teacher {teacher}: {what}; pass a model directory (with config.json) or a Hub "
            "model id"
        )
    return str(path.resolve())


def weights_identity(path: str) -> dict[str, Any]:
    """What identifies a teacher: its config and the size and head of each weight file."""
    local = Path(path)
    if not local.is_dir():
        return {"model": path}
    digest = hashlib.sha256()
    config = local / "config.json"
    digest.update(config.read_bytes())
    for file in sorted(local.glob("*.safetensors")) + sorted(local.glob("*.bin")):
        digest.update(f"|{file.name}|{file.stat().st_size}|".encode())
        with open(file, "rb") as fh:
            digest.update(fh.read(HEAD_BYTES))
    return {"model": path, "weights_sha256": digest.hexdigest()[:16]}


def _vocab_size(model: str, flag: str, *, trust_remote_code: bool) -> int:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise OpenkdError(f"{flag} {model}: could not read its config ({brief(exc)})") from exc
    return int(config.get_text_config().vocab_size)


def _load_tokenizer(path: str, teacher: str, *, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise OpenkdError(
            f"--teacher {teacher}: could not load its tokenizer ({brief(exc)}); check the path "
            "or id (remote-code models need --trust-remote-code)"
        ) from exc


def check_teacher(
    teacher: str,
    student: str,
    student_tokenizer: Any,
    *,
    trust_remote_code: bool,
    cross: str | None = None,
    served: bool = False,
) -> Teacher:
    """The method that fits this pair: one vocabulary ("same", heads of any padding), or
    another vocabulary aligned by text ("gold"/"uld", --cross-tokenizer `cross`); raise when
    none does. `cross` None (eval's reverse KL): one vocabulary and one head size only."""
    path = resolve_teacher(teacher)
    teacher_tokenizer = _load_tokenizer(path, teacher, trust_remote_code=trust_remote_code)
    teacher_vocab = teacher_tokenizer.get_vocab()
    student_vocab = student_tokenizer.get_vocab()
    wrong = vocab_mismatch(teacher_vocab, student_vocab)
    extra = len(set(student_vocab) - set(teacher_vocab))
    t_size = _vocab_size(path, "--teacher", trust_remote_code=trust_remote_code)
    s_size = _vocab_size(student, "--student", trust_remote_code=trust_remote_code)
    common: dict[str, Any] = dict(
        name=teacher,
        path=path,
        vocab_size=s_size,
        identity=weights_identity(path),
        teacher_vocab_size=t_size,
        tokenizer_size=len(teacher_tokenizer),
    )
    if wrong or extra:
        example = ""
        if wrong:
            token, t_id, s_id = wrong[0]
            theirs = "is missing" if s_id is None else f"is id {s_id}"
            example = f" (e.g. {token!r} is id {t_id} in the teacher and {theirs} in the student)"
        differ = (
            f"--teacher {teacher} and the student tokenize differently: {len(wrong) + extra:,} "
            f"tokens differ{example}"
        )
        if served:
            raise OpenkdError(f"{differ}; {SERVED_CROSS}")
        if cross is None:
            raise OpenkdError(f"{differ}; {ONE_VOCABULARY}")
        if cross == "off":
            raise OpenkdError(f"{differ}; {CROSS_TOKENIZER}")
        from openkd.distill.crosstok.preflight import cross_lines

        method = "uld" if cross == "uld" else "gold"
        return Teacher(
            **common,
            method=method,
            lines=cross_lines(teacher_tokenizer, student_tokenizer, method, cross, teacher),
        )
    shared = len(student_tokenizer)
    if t_size < shared:  # the tokenizer has ids the teacher's head cannot score
        raise OpenkdError(
            f"--teacher {teacher} has {t_size:,} logits per position but its tokenizer "
            f"{shared:,} tokens: its config does not fit its tokenizer; check the teacher"
        )
    line = (
        f"the teacher's tokenizer ({teacher}) maps all its {len(teacher_vocab):,} tokens to "
        f"the student's ids; both heads have {s_size:,} logits"
    )
    if t_size != s_size and cross is None:
        raise OpenkdError(
            f"--teacher {teacher} has {t_size:,} logits per position and the student "
            f"{s_size:,}, though their tokenizers agree (the embeddings are padded "
            f"differently); {ONE_VOCABULARY}"
        )
    if t_size != s_size:
        line = (
            f"the teacher's tokenizer ({teacher}) maps all its {len(teacher_vocab):,} tokens to "
            f"the student's ids; its head has {t_size:,} rows and the student's {s_size:,} "
            f"(padding beyond the {shared:,} tokens): the teacher's head is resized to "
            f"{s_size:,} rows, touching only rows no token uses"
        )
    return Teacher(**common, lines=[line])
