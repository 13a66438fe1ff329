"""How a model is run to answer prompts: one typed config for the engine and client settings
that `openkd generate` (the teacher) and `openkd eval` (student, base, live teacher) share, so
their flags, YAML keys and help text cannot drift apart, and eval hands them to generate's
backends as they are.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import Field, field_validator

from openkd.config import MAX_SECONDS, StageConfig

# Also train's: a model repo's own code runs only when asked for.
TRUST_REMOTE_CODE = Field(
    default=False, description="Allow model repos to run their own code. Off unless you pass it."
)


def parse_json_mapping(value: Any) -> Any:
    """A mapping flag given on the command line as JSON text (YAML gives a mapping directly)."""
    if not isinstance(value, str):
        return value
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"is not valid JSON ({exc.msg}); pass an object like '{{\"key\": 1}}'"
        ) from exc
    if not isinstance(parsed, dict):
        raise ValueError("must be a JSON object like '{\"key\": 1}'")
    return parsed


class EngineConfig(StageConfig):
    """Engine and client settings of every command that has models answer prompts."""

    concurrency: int | None = Field(
        default=None,
        gt=0,
        le=100_000,
        description="Requests kept in flight at once; answers stream back as each finishes and "
        "the next prompt goes in at once (default: vllm 2 x the engine's max_num_seqs, openai "
        "256, --serve 1024 per replica, distilabel 64, transformers 256, mock 256).",
    )

    # vLLM engine
    tensor_parallel_size: int = Field(default=1, ge=1, description="GPUs per model replica (vLLM).")
    max_model_len: int | None = Field(default=None, gt=0, description="vLLM context length limit.")
    gpu_memory_utilization: float = Field(
        default=0.9, gt=0.0, le=1.0, description="Share of GPU memory vLLM may take."
    )
    dtype: str = Field(
        default="auto", description="Weights dtype for vLLM (auto, bfloat16, float32, ...)."
    )
    max_num_seqs: int | None = Field(
        default=None, gt=0, description="vLLM's max sequences per step."
    )
    enforce_eager: bool = Field(
        default=False, description="Disable CUDA graphs in vLLM (faster start)."
    )
    vllm_args: dict[str, Any] = Field(
        default_factory=dict,
        description="More vLLM engine options as JSON, passed to vllm.LLM and as flags to the "
        'vLLM server, e.g. \'{"quantization": "fp8", "enable_prefix_caching": true}\' '
        "(YAML: a mapping). Unknown keys fail before the engine starts.",
    )
    trust_remote_code: bool = TRUST_REMOTE_CODE

    # OpenAI-compatible client and the --serve child server
    api_key_env: str = Field(
        default="OPENAI_API_KEY",
        description="Environment variable holding the API key (never logged).",
    )
    request_timeout: float = Field(
        default=3600.0,
        gt=0,
        le=MAX_SECONDS,
        description="Seconds to wait for one answer, queueing on the server included (openai); "
        "long reasoning answers take many minutes.",
    )
    max_retries: int = Field(
        default=5, ge=0, le=100, description="Retries per request, with backoff."
    )
    serve_timeout: float = Field(
        default=1800.0,
        gt=0,
        le=MAX_SECONDS,
        description="Seconds to wait for a --serve server to become healthy. 30 min: a first "
        "start of a 70B teacher downloads ~140 GB of weights before loading and compiling them, "
        "which 15 min does not cover (the Slurm scripts use the same).",
    )
    serve_args: list[str] | None = Field(
        default=None,
        description="Extra argument for the vLLM server, e.g. --serve-args=--enforce-eager.",
    )

    _vllm_args = field_validator("vllm_args", mode="before")(parse_json_mapping)

    def engine_settings(self) -> dict[str, Any]:
        """These settings as values, to build another command's config from (eval -> generate)."""
        return {name: getattr(self, name) for name in EngineConfig.model_fields}
