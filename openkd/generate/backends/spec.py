"""What a teacher backend is told: the model, its engine and client settings (`EngineConfig`),
and the few run settings a backend reads itself. Nothing about the dataset or the output.

`openkd generate` builds one from its config in one place (`teacher_spec`); `openkd eval`
builds one per model it has answer. The names are the flags' names, so a backend's
`spec.max_num_seqs` is `--max-num-seqs`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import ConfigDict, Field

from openkd.engine import EngineConfig
from openkd.generate.config import Backend, MockRule

if TYPE_CHECKING:
    from openkd.generate.config import GenerateConfig

# Where a --serve'd server logs when no output names the place (eval: generate's default output).
DEFAULT_SERVER_LOG = Path("outputs/teacher.server.log")


class TeacherSpec(EngineConfig):
    """A teacher backend's settings; defaults are `GenerateConfig`'s."""

    model_config = ConfigDict(frozen=True)

    backend: Backend = "vllm"
    teacher: str
    revision: str | None = None

    # Decoding, as far as a backend checks it or sets its engine from it (requests carry theirs)
    max_new_tokens: int = Field(default=4096, gt=0)  # must fit the engine's context
    temperature: float = Field(default=0.0, ge=0.0)  # a sampled answer needs one more top log-prob
    seed: int = 0  # the engine's seed; the client's retry jitter
    logprobs: int | None = Field(default=None, gt=0)  # top-K log-probabilities with every answer
    logprobs_dtype: Literal["float16", "float32"] = "float16"

    data_parallel_size: int = Field(default=1, ge=1)

    # OpenAI-compatible server (--backend openai)
    base_url: str | None = None
    serve: bool = False
    serve_port: int = Field(default=0, ge=0, le=65535)
    server_log: Path = DEFAULT_SERVER_LOG

    # --backend mock
    mock_rule: MockRule = "reverse"
    mock_latency: float = Field(default=0.0, ge=0.0)
    mock_fail: str | None = None
    mock_truncate: str | None = None
    mock_wrong: str | None = None

    # --backend distilabel
    llm_class: str | None = None
    llm_kwargs: dict[str, Any] = Field(default_factory=dict)


def teacher_spec(cfg: GenerateConfig) -> TeacherSpec:
    """The spec of `openkd generate`'s teacher. Only the settings the user chose are passed on,
    so `spec.model_fields_set` says what was chosen, as the config's does (distilabel classes
    keep their own API-key variable unless --api-key-env names one)."""
    from openkd.data.layout import resolve_output

    chosen = {
        name: getattr(cfg, name)
        for name in TeacherSpec.model_fields
        if name in cfg.model_fields_set and name in type(cfg).model_fields
    }
    return TeacherSpec.model_validate(
        {
            **chosen,
            "teacher": cfg.teacher,
            "backend": cfg.backend,
            # `<output stem>.server.log` beside the output (per shard, like the side files)
            "server_log": resolve_output(cfg.output, cfg.shard_index).server_log,
        }
    )
