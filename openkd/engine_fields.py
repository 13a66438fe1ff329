"""Config fields shared by the stages that run a model (generate, eval, train): one definition and
one help text each, so the flags cannot drift apart between commands."""

from __future__ import annotations

import json
from typing import Any

from pydantic import Field

TRUST_REMOTE_CODE = Field(
    False, description="Allow model repos to run their own code. Off unless you pass it."
)

# vLLM engine
TENSOR_PARALLEL_SIZE = Field(1, ge=1, description="GPUs per model replica (vLLM).")
MAX_MODEL_LEN = Field(None, gt=0, description="vLLM context length limit.")
GPU_MEMORY_UTILIZATION = Field(
    0.9, gt=0.0, le=1.0, description="Share of GPU memory vLLM may take."
)
DTYPE = Field("auto", description="Weights dtype for vLLM (auto, bfloat16, float32, ...).")
MAX_NUM_SEQS = Field(None, gt=0, description="vLLM's max sequences per step.")
ENFORCE_EAGER = Field(False, description="Disable CUDA graphs in vLLM (faster start).")

# OpenAI-compatible client and the --serve child server
API_KEY_ENV = Field(
    "OPENAI_API_KEY", description="Environment variable holding the API key (never logged)."
)
CONCURRENCY = Field(
    None,
    gt=0,
    description="Requests kept in flight at once; answers stream back as each finishes and the "
    "next prompt goes in at once (default: vllm 2 x the engine's max_num_seqs, openai 256, "
    "--serve 1024 per replica, distilabel 64, transformers 256, mock 256).",
)
REQUEST_TIMEOUT = Field(
    3600.0,
    gt=0,
    description="Seconds to wait for one answer, queueing on the server included (openai); "
    "long reasoning answers take many minutes.",
)
MAX_RETRIES = Field(5, ge=0, description="Retries per request, with backoff.")
SERVE_TIMEOUT = Field(
    900.0, gt=0, description="Seconds to wait for a --serve server to become healthy."
)
VLLM_ARGS = Field(
    default_factory=dict,
    description="More vLLM engine options as JSON, passed to vllm.LLM and as flags to the --serve "
    'server, e.g. \'{"quantization": "fp8", "enable_prefix_caching": true}\' '
    "(YAML: a mapping). Unknown keys fail before the engine starts.",
)
SERVE_ARGS = Field(
    None, description="Extra argument for the vLLM server, e.g. --serve-args=--enforce-eager."
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
