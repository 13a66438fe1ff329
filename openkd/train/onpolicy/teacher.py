"""The on-policy teacher once checked (`openkd.teacher.check`): loaded with its head resized
to the student's, and the settings that make a checkpoint this run's.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from openkd.teacher.check import Teacher


def load_resized_teacher(path: str, args: Any, rows: int) -> Any:
    """The teacher loaded as TRL would load it from `args`, its embeddings resized to `rows`
    (the student's head size; the rows past the shared tokenizer are padding)."""
    import torch
    from trl.trainer.utils import create_model_from_path

    kwargs = dict(args.teacher_model_init_kwargs or {})
    dtype = kwargs.get("dtype")
    kwargs["dtype"] = dtype if dtype in ("auto", None) else getattr(torch, dtype)
    if args.teacher_model_revision is not None:
        kwargs.setdefault("revision", args.teacher_model_revision)
    if args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED"):
        kwargs["device_map"] = None
    kwargs.setdefault("trust_remote_code", args.trust_remote_code)
    model = create_model_from_path(path, **kwargs)
    model.resize_token_embeddings(rows, mean_resizing=False)
    args.teacher_model_init_kwargs = None  # TRL refuses init kwargs with a loaded model
    return model


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
        # A served teacher's loss is over another support: not the same run (no key when local,
        # so local runs' records stay as they were).
        **({"teacher_placement": "served"} if cfg.served_teacher else {}),
        # Across tokenizers the loss is GOLD's: another run (no key for one vocabulary).
        **({"cross_tokenizer": teacher.method} if teacher.method != "same" else {}),
    }
