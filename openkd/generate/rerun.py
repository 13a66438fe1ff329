"""What a rerun does when its settings differ from the run that wrote the output.

Every `openkd generate` setting has one policy here, and a test keeps the table complete:

    continues  how the teacher runs or where rows go next (concurrency, engine, server, Hub):
               the rerun labels what is missing, the rows on disk stay as they are
    selects    which prompts are labelled (--max-samples, --shuffle-seed, more --num-samples):
               the rerun labels the newly selected prompts; rows already labelled stay
    resplits   where rows on disk belong (--eval-fraction, --keep-truncated): the rows already
               written are moved between the train, eval and truncated files first
    refuses    what a label is (teacher, sampling, prompt rendering, dataset, verification): rows
               made both ways would mix in one dataset, so the run stops with one line naming the
               setting, its old and new values, and the choice of another --output or --overwrite

The settings of the last run are the resolved config in `<stem>.meta.json`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from openkd.config import flag_name
from openkd.data.metadata import redact
from openkd.errors import OpenkdError

if TYPE_CHECKING:
    from openkd.data.metadata import GenerateMeta
    from openkd.generate.config import GenerateConfig

Policy = Literal["continues", "selects", "resplits", "refuses"]

CONTINUES: tuple[str, ...] = (
    "output", "overwrite", "push_to_hub", "private", "commit_interval", "backend",
    "data_parallel_size", "base_url", "serve", "serve_port", "mock_latency", "mock_fail",
    "concurrency", "tensor_parallel_size", "max_model_len", "gpu_memory_utilization",
    "max_num_seqs", "enforce_eager", "vllm_args", "trust_remote_code", "api_key_env",
    "request_timeout", "max_retries", "serve_timeout", "serve_args",
)  # fmt: skip
SELECTS: tuple[str, ...] = ("max_samples", "shuffle_seed", "shard", "num_samples")
RESPLITS: tuple[str, ...] = ("eval_fraction", "keep_truncated")
REFUSES: tuple[str, ...] = (
    "teacher", "revision", "dataset", "split", "subset", "prompt_column", "messages_column",
    "prompt_template", "system_prompt", "temperature", "top_p", "max_new_tokens", "stop", "seed",
    "logprobs", "logprobs_dtype", "verify", "answer_column", "answer_regex", "keep", "dtype",
    "mock_rule", "mock_truncate", "mock_wrong", "llm_class", "llm_kwargs",
)  # fmt: skip

POLICY: dict[str, Policy] = {
    **dict.fromkeys(CONTINUES, "continues"),
    **dict.fromkeys(SELECTS, "selects"),
    **dict.fromkeys(RESPLITS, "resplits"),
    **dict.fromkeys(REFUSES, "refuses"),
}

# Settings that continue in general but refuse in part: vLLM engine options that change the
# numbers the teacher computes, and a switch between the mock and a real model.
LABEL_VLLM_ARGS = (
    "quantization", "kv_cache_dtype", "dtype", "tokenizer", "tokenizer_mode",
    "tokenizer_revision", "hf_overrides", "generation_config", "override_generation_config",
)  # fmt: skip


def _backend_kind(value: Any) -> str:
    return "the mock teacher" if value == "mock" else "a model"


def _label_vllm_args(value: Any) -> dict[str, Any]:
    return {k: v for k, v in (value or {}).items() if k in LABEL_VLLM_ARGS}


def _dataset(value: Any) -> str:
    """A local dataset by its real path (the same file typed two ways is one dataset)."""
    return dataset_path(str(value)) or str(value)


# How a setting is compared when its raw value may differ without the label changing.
PARTIAL: dict[str, Callable[[Any], Any]] = {"backend": _backend_kind, "vllm_args": _label_vllm_args}


@dataclass
class RerunPlan:
    """What a rerun must do before it labels: the settings whose rows must be re-sorted."""

    resplit: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # name -> (old, new)
    continued: list[str] = field(default_factory=list)  # changed settings that just continue


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def _show(value: Any) -> str:
    return "unset" if value is None else repr(value)


def plan_rerun(previous: GenerateMeta | None, cfg: GenerateConfig, has_rows: bool) -> RerunPlan:
    """Compare this run's settings with the last run's; raise on a setting that would mix labels.

    An output without rows, or written by an openkd that recorded no config, has nothing to
    compare with.
    """
    plan = RerunPlan()
    if not has_rows or previous is None or not previous.config:
        return plan
    old_cfg = previous.config
    new_cfg = redact(cfg.to_yaml_dict())
    refused = []
    for name, policy in POLICY.items():
        if name not in old_cfg or name not in new_cfg:
            continue  # a setting this output's openkd did not know
        old, new = old_cfg[name], new_cfg[name]
        if name == "dataset":
            old = previous.source.get("dataset_path") or _dataset(old)
            new = _dataset(new)
        if _same(old, new):
            continue
        if name in PARTIAL:
            key = PARTIAL[name]
            if not _same(key(old), key(new)):
                refused.append(f"{flag_name(name)} {_show(key(old))} (this run: {_show(key(new))})")
            else:
                plan.continued.append(name)
        elif name == "num_samples" and new < old:
            refused.append(
                f"{flag_name(name)} {old} (this run: {new}, fewer samples a prompt than the "
                "output holds)"
            )
        elif policy == "refuses":
            refused.append(f"{flag_name(name)} {_show(old)} (this run: {_show(new)})")
        elif policy == "resplits":
            plan.resplit[name] = (old, new)
        else:
            plan.continued.append(name)
    if refused:
        output = cfg.output
        raise OpenkdError(
            f"{output} holds rows labelled with {'; '.join(refused)}; rows labelled two ways "
            "would mix in one dataset: pass another --output for these settings, or --overwrite "
            f"to relabel everything into {output.name}"
        )
    return plan


def dataset_path(spec: str) -> str | None:
    """The real path of a local dataset, recorded so reruns from another directory match."""
    expanded = os.path.expanduser(spec)
    return os.path.realpath(expanded) if os.path.exists(expanded) else None


def describe(plan: RerunPlan) -> list[str]:
    """One line per changed setting this rerun acts on."""
    return [
        f"{flag_name(name)} changed from {_show(old)} to {_show(new)}: rows already written are "
        "re-sorted into the train, eval and truncated files"
        for name, (old, new) in plan.resplit.items()
    ]
