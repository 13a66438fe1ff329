"""The student's tokenizer, chat template and EOS settings, loaded without its weights.

Everything here reads small files (tokenizer, config.json, generation_config.json) so the
template and EOS checks fail in seconds, before the weights are loaded. Weights are loaded by
TRL (`from_pretrained` on the same path). `trust_remote_code` is passed only when the user
asked for it; chat templates render in transformers' sandboxed Jinja environment.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from openkd.errors import OpenkdError, brief


@dataclass(frozen=True)
class EosSettings:
    model_eos: int | list[int] | None
    generation_eos: int | list[int] | None


def is_local(student: str) -> bool:
    return student.startswith(("/", "./", "../", "~")) or os.path.exists(
        os.path.expanduser(student)
    )


def resolve_student(student: str) -> str:
    """A local student as an absolute path (checked), a Hub id unchanged."""
    if not is_local(student):
        return student
    path = Path(student).expanduser()
    if not path.exists():
        raise OpenkdError(
            f"--student {student}: no such directory; pass a model directory (with config.json) "
            "or a Hub model id"
        )
    if not (path / "config.json").is_file():
        raise OpenkdError(
            f"--student {student} has no config.json, so it is not a model directory; pass the "
            "directory `save_pretrained` wrote, or a Hub model id"
        )
    return str(path.resolve())


def read_template_file(path: str) -> str:
    file = Path(path).expanduser()
    if not file.is_file():
        raise OpenkdError(f"--chat-template {path}: no such file; pass a Jinja chat template file")
    text = file.read_text(encoding="utf-8")
    if not text.strip():
        raise OpenkdError(f"--chat-template {path} is empty; pass a Jinja chat template file")
    return text


def load_tokenizer(student: str, *, trust_remote_code: bool, chat_template: str | None) -> Any:
    """The student's tokenizer, with `--chat-template` applied; error if it has no template."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(student, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise OpenkdError(
            f"--student {student}: could not load its tokenizer ({brief(exc)}); check the path "
            "or id (remote-code models need --trust-remote-code)"
        ) from exc
    if chat_template is not None:
        tokenizer.chat_template = read_template_file(chat_template)
    from openkd.chat import template_text

    if template_text(tokenizer) is None:
        raise OpenkdError(
            f"--student {student} has no chat template (a base model?); pass --chat-template "
            "FILE with a Jinja chat template whose assistant turns end with the EOS token "
            f"{tokenizer.eos_token!r}"
        )
    return tokenizer


def load_eos_settings(student: str, *, trust_remote_code: bool) -> EosSettings:
    """eos_token_id of the model config and of the generation config the student ships."""
    from transformers import AutoConfig, GenerationConfig

    try:
        config = AutoConfig.from_pretrained(student, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise OpenkdError(f"--student {student}: could not read its config ({brief(exc)})") from exc
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    try:
        generation = GenerationConfig.from_pretrained(student)
    except OSError:  # no generation_config.json: transformers derives one from the config
        generation = GenerationConfig.from_model_config(config)
    return EosSettings(
        model_eos=getattr(text_config, "eos_token_id", None),
        generation_eos=generation.eos_token_id,
    )
