"""openkd's flags as TRL `SFTConfig` keyword arguments, plus the YAML-only `sft_args` pass-through.

openkd passes its own defaults explicitly instead of SFTConfig's (bf16 on, gradient
checkpointing on), trains on the completion only (TRL's `completion_only_loss=True`), packs
with TRL's `bfd` strategy, and saves a checkpoint every `--save-steps` (always one at the last
step, so a finished run can be resumed to redo the save or the push). Any other SFTConfig field
can be set under `sft_args:` in the YAML `train:` section; fields openkd sets itself are
refused there with the flag to use instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from openkd.config import did_you_mean
from openkd.errors import ConfigError

if TYPE_CHECKING:
    from openkd.train.config import TrainConfig

# SFTConfig fields openkd sets, and how a user sets them instead.
OWNED: dict[str, str] = {
    "output_dir": "use --output-dir",
    "per_device_train_batch_size": "use --batch-size",
    "per_device_eval_batch_size": "use --batch-size",
    "gradient_accumulation_steps": "use --gradient-accumulation-steps",
    "num_train_epochs": "use --epochs",
    "max_steps": "use --max-steps",
    "learning_rate": "use --learning-rate",
    "lr_scheduler_type": "use --lr-scheduler-type",
    "warmup_steps": "use --warmup-ratio",
    "weight_decay": "use --weight-decay",
    "bf16": "use --bf16 / --no-bf16",
    "gradient_checkpointing": "use --gradient-checkpointing",
    "seed": "use --seed",
    "save_steps": "use --save-steps",
    "save_total_limit": "use --save-total-limit",
    "save_strategy": "openkd saves every --save-steps and at the end",
    "logging_steps": "use --logging-steps",
    "eval_steps": "use --eval-steps",
    "eval_strategy": "openkd evaluates every --eval-steps when there is an eval split",
    "report_to": "use --report-to",
    "push_to_hub": "use --push-to-hub",
    "hub_model_id": "use --push-to-hub",
    "hub_private_repo": "use --private",
    "max_length": "use --max-length",
    "packing": "use --packing",
    "packing_strategy": "--packing uses TRL's bfd strategy",
    "completion_only_loss": "openkd always trains on the teacher's answer only",
    "assistant_only_loss": "openkd always trains on the teacher's answer only",
    "trust_remote_code": "use --trust-remote-code",
    "chat_template_path": "use --chat-template",
    "eos_token": "use --eos-token",
    "use_cpu": "openkd trains on CPU only when no GPU is visible",
    "resume_from_checkpoint": "use --resume",
    "deepspeed": "use --deepspeed or --accelerate-config",
    "include_num_input_tokens_seen": "openkd counts tokens for its summary",
    "logging_nan_inf_filter": "openkd stops at a non-finite loss instead of hiding it",
    "dataset_kwargs": "openkd has TRL prepare the conversational data itself",
}


def sft_fields() -> set[str]:
    import dataclasses

    from trl import SFTConfig

    return {f.name for f in dataclasses.fields(SFTConfig)}


def check_sft_args(sft_args: dict[str, Any], valid: set[str]) -> None:
    """One-line ConfigError for an unknown SFTConfig field or one openkd sets itself."""
    for key, value in sft_args.items():
        if key in OWNED:
            raise ConfigError(f"sft_args.{key}: openkd sets this itself; {OWNED[key]}")
        if key not in valid:
            hint = did_you_mean(key, valid, cutoff=0.7)
            raise ConfigError(
                f"sft_args.{key} is not a trl.SFTConfig field{hint}; see "
                "https://huggingface.co/docs/trl/sft_trainer for the valid ones"
            )
        if key == "model_init_kwargs" and isinstance(value, dict) and "trust_remote_code" in value:
            raise ConfigError(
                "sft_args.model_init_kwargs.trust_remote_code: use --trust-remote-code"
            )


def report_to(value: str) -> str | list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    return "none" if not names or names == ["none"] else names


def check_report_to(value: str) -> None:
    """Each tracker must be one transformers knows and installed, before the model loads."""
    names = report_to(value)
    if names == "none":
        return
    from transformers.integrations.integration_utils import (
        INTEGRATION_TO_CALLBACK,
        get_available_reporting_integrations,
    )

    available = set(get_available_reporting_integrations())
    for name in names:
        if name == "all":
            continue
        if name not in INTEGRATION_TO_CALLBACK:
            raise ConfigError(
                f"--report-to {name}: not a tracker transformers supports; use none or one of "
                f"{', '.join(sorted(INTEGRATION_TO_CALLBACK))}"
            )
        if name not in available:
            raise ConfigError(
                f"--report-to {name}: its Python package is not installed; install it "
                "(e.g. `pip install " + name.replace("_", "-") + "`) or pass --report-to none"
            )


def sft_kwargs(cfg: TrainConfig, *, cuda: bool, bf16_gpu: bool, has_eval: bool) -> dict[str, Any]:
    """SFTConfig keyword arguments for `cfg`; `cuda`/`bf16_gpu` describe this machine."""
    wants_fp16 = bool(cfg.sft_args.get("fp16"))
    bf16 = cfg.bf16 if cfg.bf16 is not None else (cuda and bf16_gpu and not wants_fp16)
    kwargs: dict[str, Any] = {
        "output_dir": str(cfg.output_dir),
        "per_device_train_batch_size": cfg.batch_size,
        "per_device_eval_batch_size": cfg.batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "num_train_epochs": cfg.epochs,
        "max_steps": cfg.max_steps if cfg.max_steps is not None else -1,
        "learning_rate": cfg.learning_rate,
        "lr_scheduler_type": cfg.lr_scheduler_type,
        "warmup_steps": cfg.warmup_ratio,  # a float below 1 is a share of the steps
        "weight_decay": cfg.weight_decay,
        "bf16": bf16,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "seed": cfg.seed,
        "save_strategy": "steps",
        "save_steps": cfg.save_steps,
        "save_total_limit": cfg.save_total_limit,
        "logging_strategy": "steps",
        "logging_steps": cfg.logging_steps,
        "logging_first_step": True,
        "eval_strategy": "steps" if has_eval else "no",
        "report_to": report_to(cfg.report_to),
        "max_length": cfg.max_length,
        "packing": cfg.packing,
        "packing_strategy": "bfd",
        "completion_only_loss": True,
        "assistant_only_loss": False,
        "trust_remote_code": cfg.trust_remote_code,
        "eos_token": cfg.eos_token,
        "use_cpu": not cuda,
        "push_to_hub": False,
        # Padding-free batches (packing) have no padding to leave out of the count.
        "include_num_input_tokens_seen": "all" if cfg.packing else "non_padding",
        # A NaN loss stops the run (openkd.train.guard); the filter would log an average instead.
        "logging_nan_inf_filter": False,
    }
    if has_eval:
        kwargs["eval_steps"] = cfg.eval_steps or cfg.save_steps
    kwargs.update(cfg.sft_args)
    return kwargs


def make_sft_config(kwargs: dict[str, Any]):
    """Build the SFTConfig; its validation errors become one-line ConfigErrors."""
    from trl import SFTConfig

    return build_trl_config(SFTConfig, kwargs)


def build_trl_config(config_class: Any, kwargs: dict[str, Any]):
    """Build a TRL training config (SFTConfig, DistillationConfig); its validation errors become
    one-line ConfigErrors."""
    try:
        return config_class(**kwargs)
    except (ValueError, TypeError) as exc:
        text = " ".join(str(exc).split())
        if "bf16" in text and kwargs.get("bf16"):
            raise ConfigError(
                "--bf16 needs a GPU with bfloat16 support (NVIDIA Ampere or newer); pass "
                "--no-bf16, or set `fp16: true` under sft_args on older GPUs"
            ) from exc
        raise ConfigError(f"invalid training settings: {text[:400]}") from exc


def lora_config(cfg: TrainConfig):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.lora_target_modules or "all-linear",
        task_type="CAUSAL_LM",
    )
