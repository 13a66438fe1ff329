"""Config fields shared by the stages that run a model (generate, eval, train): one definition and
one help text each, so the flags cannot drift apart between commands."""

from __future__ import annotations

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
CONCURRENCY = Field(64, gt=0, description="Requests in flight at once (openai).")
REQUEST_TIMEOUT = Field(600.0, gt=0, description="Seconds per request (openai).")
MAX_RETRIES = Field(5, ge=0, description="Retries per request, with backoff.")
SERVE_TIMEOUT = Field(
    900.0, gt=0, description="Seconds to wait for a --serve server to become healthy."
)
SERVE_ARGS = Field(
    None, description="Extra argument for the vLLM server, e.g. --serve-args=--enforce-eager."
)
