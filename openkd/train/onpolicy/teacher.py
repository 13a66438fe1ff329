"""The on-policy teacher before its weights load: where it is, whether it shares the student's
vocabulary, and what identifies it for the run record.

The loss compares the two models' next-token distributions id by id, so every token must have
the same id in both tokenizers and both heads must be the same size. Checked from the
tokenizer and config files alone, in seconds, before any weights load.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from openkd.errors import OpenkdError, brief
from openkd.train.soft import vocab_mismatch
from openkd.train.student import is_local

CROSS_TOKENIZER = (
    "on-policy distillation compares the two models' next-token distributions id by id, so "
    "they must share one vocabulary: pick a teacher of the student's family (distilling across "
    "tokenizers is the planned --cross-tokenizer option, not available yet)"
)
# Bytes hashed from the start of each weight file: enough to tell two checkpoints apart (the
# header names every tensor and its offsets) without reading a 100 GB teacher.
HEAD_BYTES = 1 << 20


@dataclass(frozen=True)
class Teacher:
    """A teacher checked against the student, ready for TRL to load."""

    name: str  # as the user gave it
    path: str  # absolute for a local directory, the id for a Hub model
    vocab_size: int  # both models' logits size
    identity: dict[str, Any] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)


def resolve_teacher(teacher: str) -> str:
    """A local teacher as an absolute path (checked), a Hub id unchanged."""
    if not is_local(teacher):
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


def check_teacher(
    teacher: str, student: str, student_tokenizer: Any, *, trust_remote_code: bool
) -> Teacher:
    """Raise unless the teacher maps every token as the student does and has its head size."""
    from transformers import AutoTokenizer

    path = resolve_teacher(teacher)
    try:
        teacher_tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise OpenkdError(
            f"--teacher {teacher}: could not load its tokenizer ({brief(exc)}); check the path "
            "or id (remote-code models need --trust-remote-code)"
        ) from exc
    teacher_vocab = teacher_tokenizer.get_vocab()
    student_vocab = student_tokenizer.get_vocab()
    wrong = vocab_mismatch(teacher_vocab, student_vocab)
    extra = len(set(student_vocab) - set(teacher_vocab))
    if wrong or extra:
        example = ""
        if wrong:
            token, t_id, s_id = wrong[0]
            theirs = "is missing" if s_id is None else f"is id {s_id}"
            example = f" (e.g. {token!r} is id {t_id} in the teacher and {theirs} in the student)"
        raise OpenkdError(
            f"--teacher {teacher} and the student tokenize differently: {len(wrong) + extra:,} "
            f"tokens differ{example}; {CROSS_TOKENIZER}"
        )
    t_size = _vocab_size(path, "--teacher", trust_remote_code=trust_remote_code)
    s_size = _vocab_size(student, "--student", trust_remote_code=trust_remote_code)
    if t_size != s_size:
        raise OpenkdError(
            f"--teacher {teacher} has {t_size:,} logits per position and the student "
            f"{s_size:,}, though their tokenizers agree (the embeddings are padded "
            f"differently); TRL's DistillationTrainer needs equal sizes: {CROSS_TOKENIZER}"
        )
    return Teacher(
        name=teacher,
        path=path,
        vocab_size=s_size,
        identity=weights_identity(path),
        lines=[
            f"the teacher's tokenizer ({teacher}) maps all its {len(teacher_vocab):,} tokens to "
            f"the student's ids; both heads have {s_size:,} logits",
        ],
    )


def identity_settings(cfg: Any, teacher: Teacher) -> dict[str, Any]:
    """The on-policy settings that make a checkpoint this run's (for openkd_run.json)."""
    return {
        "loss": cfg.loss,
        "teacher": json.loads(json.dumps(teacher.identity)),
        "kd_beta": cfg.beta,
        "kd_lambda": cfg.lmbda,
        "kd_temperature": cfg.temperature,
        "max_completion_length": cfg.completion_tokens,
        "num_samples": cfg.samples_per_prompt,
        "sampling_temperature": cfg.sampling_temperature or 1.0,
        "sampling_top_p": cfg.sampling_top_p or 1.0,
    }
