"""`openkd eval` settings: one typed field per flag and YAML key."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from openkd.config import MAX_TOKENS
from openkd.data.fields import Split, Subset
from openkd.engine import EngineConfig
from openkd.generate.config import Backend

DEFAULT_MAX_NEW_TOKENS = 4096
# Backends that can load a student (mock and distilabel answer as a teacher only).
StudentBackend = Literal["vllm", "openai", "transformers"]


class EvalConfig(EngineConfig):
    """Score a student against its teacher on held-out prompts (stage 3)."""

    section: ClassVar[str] = "eval"

    # What to compare
    student: str = Field(description="Student model to score: local path or Hub id.")
    dataset: str = Field(
        description="Held-out prompts, normally the <stem>.eval.jsonl `openkd generate` wrote "
        "(JSONL, save_to_disk directory or Hub id)."
    )
    split: Split = "train"
    subset: Subset = None
    prompt_column: str = Field(
        "prompt", description="Column with the prompt (text or a list of chat messages)."
    )
    reference_column: str = Field(
        "completion",
        description="Column with the teacher's answer (text or chat messages) to compare against.",
    )
    teacher: str | None = Field(
        None,
        description="Have this teacher answer the prompts live instead of reading "
        "--reference-column.",
    )
    teacher_backend: Backend | None = Field(
        None, description="Backend for the live --teacher (default: --backend)."
    )
    base: str | None = Field(
        None, description="Also score this model (the untrained student) to show the gain."
    )
    answer_column: str = Field(
        "answer",
        description="Column with gold final answers; when present, final-answer accuracy is "
        "reported for teacher and student.",
    )
    answer_regex: str | None = Field(
        None,
        description="Regex extracting the final answer (group 1 if it has one), compared with "
        "the gold answer as text (case, punctuation and spaces ignored; numbers by value). "
        "Default: math-verify equivalence of the final \\boxed{...} or expression "
        "(\\frac{1}{2} = 0.5).",
    )
    max_samples: int | None = Field(None, gt=0, description="Score at most this many prompts.")

    # Where it goes
    output_dir: Path = Field(
        Path("outputs/eval"), description="report.json and examples.jsonl are written here."
    )
    overwrite: bool = Field(
        False, description="Recompute even if report.json already holds these inputs' scores."
    )

    # Decoding: the teacher's, so agreement is measured like for like
    max_new_tokens: int | None = Field(
        None,
        gt=0,
        le=MAX_TOKENS,
        description="Longest answer, in tokens (default: what `openkd generate` recorded in "
        f"<stem>.meta.json, else {DEFAULT_MAX_NEW_TOKENS}).",
    )
    stop: list[str] | None = Field(
        None, description="Extra stop string (default: the teacher's, from <stem>.meta.json)."
    )
    system_prompt: str | None = Field(
        None, description="System message put before every prompt (replaces the dataset's)."
    )

    # Engine (the same backends as `openkd generate`; shared settings: EngineConfig)
    backend: StudentBackend = Field(
        "vllm",
        description="Backend the student answers with: vllm, openai, transformers (small CPU "
        "models).",
    )
    base_url: str | None = Field(
        None,
        description="OpenAI-compatible endpoint serving the one model on backend openai "
        "(--backend or --teacher-backend).",
    )
    serve: bool = Field(
        False, description="Start a vLLM server for each model as a child process and use it."
    )

    # Teacher-forced likelihood
    nll: bool = Field(
        True,
        description="Also compute each model's negative log-likelihood / perplexity of the "
        "teacher's answers (transformers).",
    )
    nll_batch_size: int = Field(8, gt=0, description="Examples per forward pass for --nll.")
    nll_max_length: int = Field(
        4096,
        gt=0,
        le=MAX_TOKENS,
        description="Longest prompt+answer scored for --nll, in tokens; longer are cut.",
    )

    removed: ClassVar[dict[str, str]] = {
        "batch_size": "models answer through a stream, not batches; --concurrency sets how "
        "many requests are in flight",
    }

    @model_validator(mode="after")
    def _check(self) -> EvalConfig:
        problems: list[str] = []
        on_openai = [name for name, backend in self.backends().items() if backend == "openai"]
        if on_openai and not (self.base_url or self.serve):
            problems.append("backend openai needs --base-url URL or --serve")
        if self.vllm_args and not ("vllm" in self.backends().values() or self.serve):
            problems.append("--vllm-args configures a vLLM engine: use backend vllm or --serve")
        if self.serve and not on_openai:
            problems.append(
                "--serve starts an OpenAI-compatible server; use it with backend openai"
            )
        if self.base_url and not self.serve and len(on_openai) > 1:
            problems.append(
                f"--base-url serves one model but {' and '.join(on_openai)} use backend openai; "
                "pass --serve or give one of them another backend"
            )
        if self.teacher is None and self.reference_column == self.prompt_column:
            problems.append(
                f"--reference-column {self.reference_column} is also the --prompt-column: the "
                "reference is the teacher's answer, not the prompt; pass the column with the "
                "teacher's answers (default completion), or --teacher MODEL"
            )
        if self.stop and "" in self.stop:
            problems.append("--stop '' is empty and would stop nothing; drop it")
        if self.answer_regex is not None:
            import re

            try:
                re.compile(self.answer_regex)
            except re.error as exc:
                problems.append(f"--answer-regex is not a valid regex ({exc})")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def backends(self) -> dict[str, str]:
        """Which backend answers for each model that generates: student, base, live teacher."""
        out: dict[str, str] = {"student": self.backend}
        if self.base:
            out["base"] = self.backend
        if self.teacher:
            out["teacher"] = self.teacher_backend or self.backend
        return out
