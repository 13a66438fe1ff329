"""openkd's flags as TRL `DistillationConfig` keyword arguments.

The Trainer settings are the hard-label ones (`openkd.train.arguments.sft_kwargs`) less the
SFT-only fields; the on-policy flags set the divergence and the student's sampling. `sft_args:`
in YAML takes any other `DistillationConfig` field here (e.g. `use_vllm: true` for student
generation in vLLM on a GPU, `teacher_model_init_kwargs`, `generation_kwargs`).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from openkd.errors import ConfigError

if TYPE_CHECKING:
    from openkd.train.config import TrainConfig

# DistillationConfig fields the on-policy flags set, and the flag to use instead.
OWNED: dict[str, str] = {
    "beta": "use --kd-beta",
    "temperature": "use --kd-temperature (the divergence) or --sampling-temperature (sampling)",
    "top_p": "use --sampling-top-p",
    "max_completion_length": "use --max-completion-length",
    "teacher_model_name_or_path": "use --teacher",
    "teacher_model_server_url": "use --teacher-base-url or --teacher-serve",
}


def _config_class(served: bool) -> Any:
    if served:  # the teacher behind a vLLM server: TRL's experimental server distillation
        from trl.experimental.server_distillation import ServerDistillationConfig

        return ServerDistillationConfig
    from trl import DistillationConfig

    return DistillationConfig


def distillation_fields(served: bool = False) -> set[str]:
    return {f.name for f in dataclasses.fields(_config_class(served))}


def check_distillation_args(sft_args: dict[str, Any], served: bool = False) -> None:
    """One-line ConfigError for a key the on-policy flags own, or not a DistillationConfig field."""
    from openkd.train.arguments import check_sft_args

    for key in sft_args:
        if key in OWNED:
            raise ConfigError(f"sft_args.{key}: openkd sets this itself; {OWNED[key]}")
    try:
        check_sft_args(sft_args, distillation_fields(served))
    except ConfigError as exc:
        raise ConfigError(
            str(exc)
            .replace("trl.SFTConfig", "trl.DistillationConfig (--loss on-policy)")
            .replace("sft_trainer", "distillation_trainer")
        ) from exc


def distillation_kwargs(
    cfg: TrainConfig, *, cuda: bool, bf16_gpu: bool, has_eval: bool
) -> dict[str, Any]:
    """DistillationConfig keyword arguments for `cfg`; `cuda`/`bf16_gpu` describe this machine."""
    from openkd.train.arguments import sft_kwargs

    fields = distillation_fields()
    base = sft_kwargs(cfg, cuda=cuda, bf16_gpu=bf16_gpu, has_eval=has_eval)
    kwargs = {key: value for key, value in base.items() if key in fields}
    user_generation = dict(cfg.sft_args.get("generation_kwargs") or {})
    kwargs.update(
        beta=cfg.beta,
        temperature=cfg.temperature,  # TRL divides both models' logits by it in the loss
        top_p=cfg.sampling_top_p or 1.0,
        top_k=0,
        max_completion_length=cfg.completion_tokens,
        # Sampling has its own temperature: TRL lets generation_kwargs override its own.
        generation_kwargs={"temperature": cfg.sampling_temperature or 1.0, **user_generation},
        # TRL counts prompt and sampled tokens itself; the Trainer's count needs input_ids.
        include_num_input_tokens_seen="no",
    )
    if kwargs.get("bf16") and "teacher_model_init_kwargs" not in cfg.sft_args:
        kwargs["teacher_model_init_kwargs"] = {"dtype": "bfloat16"}  # inference only
    return kwargs


def make_distillation_config(kwargs: dict[str, Any], served_url: str | None = None):
    """Build the DistillationConfig (ServerDistillationConfig for a teacher server at
    `served_url`); its validation errors become one-line ConfigErrors."""
    from openkd.train.arguments import build_trl_config

    if served_url is not None:
        kwargs = {**kwargs, "teacher_model_server_url": served_url}
        kwargs.pop("teacher_model_init_kwargs", None)
    return build_trl_config(_config_class(served_url is not None), kwargs)
