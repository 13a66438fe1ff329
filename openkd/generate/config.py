"""`openkd generate` settings: one typed field per flag and YAML key."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from openkd.config import INT64_MAX, MAX_TOKENS, cli_only
from openkd.data.fields import PROMPTS_HELP, MessagesColumn, PromptColumn, Split, Subset
from openkd.engine import EngineConfig

Backend = Literal["vllm", "openai", "mock", "distilabel", "transformers"]
MockRule = Literal["reverse", "sum", "echo"]

SHARD_RE = re.compile(r"^(\d+)/(\d+)$")


class GenerateConfig(EngineConfig):
    """Label every prompt of a dataset with a teacher's greedy answer (stage 1)."""

    section: ClassVar[str] = "generate"

    # What to label
    teacher: str = Field(description="Teacher model: local path or Hub id (for mock: any name).")
    revision: str | None = Field(None, description="Teacher revision (branch, tag or commit).")
    dataset: str = Field(description=PROMPTS_HELP)
    split: Split = "train"
    subset: Subset = None
    prompt_column: PromptColumn = None
    messages_column: MessagesColumn = None
    prompt_template: str | None = Field(
        None,
        description="Jinja template over the row's columns, rendered sandboxed, "
        "e.g. 'Solve: {{ problem }}'.",
    )
    system_prompt: str | None = Field(None, description="System message put before every prompt.")
    max_samples: int | None = Field(None, gt=0, description="Label at most this many prompts.")
    shuffle_seed: int | None = Field(
        None, ge=0, description="Shuffle the prompts with this seed before --max-samples."
    )
    shard: str | None = Field(
        None,
        description="Take shard i of n (0-based, 'i/n', split by prompt hash) for Slurm arrays; "
        "writes <output>.shard-i-of-n.jsonl; join them with `openkd merge`.",
    )
    eval_fraction: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Hold out this share of prompts (by id hash) into <output>.eval.jsonl.",
    )

    # Where it goes
    output: Path = Field(
        Path("outputs/teacher.jsonl"), description="JSONL file the labelled rows are appended to."
    )
    overwrite: bool = Field(False, description="Delete earlier output and start fresh.")
    keep_truncated: bool = Field(
        False, description="Keep answers cut at --max-new-tokens and empty answers in the output."
    )
    verify: Literal["math", "exact"] | None = Field(
        None,
        description="Check each answer's final answer against --answer-column: math "
        "(math-verify: equivalent forms match) or exact (normalised text, --answer-regex); "
        "answers that fail go to <output>.rejected.jsonl and are not trained on.",
    )
    answer_column: str = Field(
        "answer", description="Column with the gold final answer, for --verify."
    )
    answer_regex: str | None = Field(
        None,
        description="Regex extracting the final answer for --verify (group 1 if it has one; "
        "default: the last \\boxed{...}).",
    )
    num_samples: int = Field(
        1,
        ge=1,
        le=1000,
        description="Answers per prompt (rejection sampling; needs --temperature > 0). Each has "
        "its own id and seed, so a rerun labels every sample exactly once.",
    )
    keep: Literal["all-verified", "first-verified", "all"] | None = Field(
        None,
        description="With --verify, the answers kept for training: every verified one "
        "(all-verified, the default), one per prompt (first-verified: the lowest sample number "
        "that verified), or all, verdict recorded (all).",
    )
    logprobs: int | None = Field(
        None,
        gt=0,
        le=1000,
        description="Also keep the teacher's top-K log-probabilities at every answer position "
        "(soft labels for `openkd train --loss soft|mix`), in <output>.logprobs/; 20 is vLLM's "
        "default limit (openkd raises it for its own engines; a server you run needs "
        "--max-logprobs K, or K+1 with --temperature > 0).",
    )
    logprobs_dtype: Literal["float16", "float32"] = Field(
        "float16", description="Storage of the --logprobs log-probabilities."
    )
    push_to_hub: str | None = Field(None, description="Push the finished dataset to this Hub repo.")
    private: bool = Field(False, description="Make the Hub dataset repo private.")

    # Decoding (greedy: hard-label distillation)
    temperature: float = Field(
        0.0, ge=0.0, description="Sampling temperature; 0 is greedy, anything else warns."
    )
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling cut-off.")
    max_new_tokens: int = Field(4096, gt=0, le=MAX_TOKENS, description="Longest answer, in tokens.")
    stop: list[str] | None = Field(None, description="Extra stop string.")
    seed: int = Field(
        0,
        description="Sampling seed, sent with every request (sample i of a prompt: seed + i; "
        "any 64-bit integer).",
    )

    # Engine
    backend: Backend = Field(
        "vllm",
        description="Teacher backend: vllm, openai, mock, distilabel, transformers (small CPU models).",
    )
    commit_interval: float = Field(
        1.0,
        gt=0,
        le=3600,
        description="Seconds between fsyncs of the output (and at exit): a kill loses at most "
        "the answers that finished in the last interval.",
    )
    data_parallel_size: int = Field(1, ge=1, description="Teacher replicas (vLLM, --serve).")

    # OpenAI-compatible server (the engine and client settings shared with eval: EngineConfig)
    base_url: str | None = Field(
        None, description="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1."
    )
    serve: bool = Field(
        False, description="Start `vllm serve` for --teacher as a child process and use it."
    )
    serve_port: int = Field(0, ge=0, le=65535, description="Port for --serve (0 picks a free one).")

    # Mock teacher
    mock_rule: MockRule = Field(
        "reverse", description="Mock answer rule: reverse (words), sum (numbers), echo."
    )
    mock_latency: float = Field(
        0.0,
        ge=0.0,
        le=10.0,
        description="Mock seconds per answer token: answers take time in proportion to their "
        "length, --concurrency at once, so they finish out of order like a real engine's.",
    )
    mock_fail: str | None = Field(None, description="Regex: mock fails prompts that match it.")
    mock_truncate: str | None = Field(
        None, description="Regex: mock answers to matching prompts end with finish_reason=length."
    )
    mock_wrong: str | None = Field(
        None,
        description="Regex: the mock answers matching prompts wrongly on even-numbered samples "
        "(sample 0 included), rightly on odd ones; for --verify and --num-samples tests.",
    )

    # distilabel adapter
    llm_class: str | None = Field(
        None, description="distilabel LLM class, e.g. distilabel.models.AnthropicLLM."
    )
    llm_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Keyword arguments for --llm-class (YAML only).",
        json_schema_extra=cli_only(),
    )

    removed: ClassVar[dict[str, str]] = {
        "batch_size": "stage 1 streams answers and has no batches; --concurrency sets how many "
        "requests are in flight",
    }

    @model_validator(mode="after")
    def _check(self) -> GenerateConfig:
        problems: list[str] = []
        if self.prompt_column and self.messages_column:
            problems.append("pass either --prompt-column or --messages-column, not both")
        if self.prompt_template and self.messages_column:
            problems.append("--prompt-template builds a text prompt; drop --messages-column")
        if self.prompt_template and self.prompt_column:
            problems.append(
                "--prompt-template reads the row's columns by name, so --prompt-column would be "
                "ignored; drop it (write {{ column }} in the template)"
            )
        if self.stop and "" in self.stop:
            problems.append("--stop '' is empty and would stop nothing; drop it")
        if self.logprobs is None and self.chosen("logprobs_dtype"):
            problems.append(
                "--logprobs-dtype stores the log-probabilities of --logprobs K; pass --logprobs "
                "K or drop --logprobs-dtype"
            )
        if self.seed + self.num_samples - 1 > INT64_MAX:
            problems.append(
                f"--seed {self.seed}: sample {self.num_samples - 1} of a prompt gets seed + "
                f"{self.num_samples - 1}, which does not fit a 64-bit integer; pass a smaller seed"
            )
        if self.shard is not None:
            m = SHARD_RE.match(self.shard)
            if not m or int(m.group(2)) == 0 or int(m.group(1)) >= int(m.group(2)):
                problems.append(
                    f"--shard '{self.shard}' is malformed; use i/n with 0 <= i < n, e.g. --shard 0/8"
                )
        if self.backend == "openai" and not (self.base_url or self.serve):
            problems.append("--backend openai needs --base-url URL or --serve")
        if self.serve and self.backend != "openai":
            problems.append(
                "--serve starts an OpenAI-compatible server; use it with --backend openai"
            )
        if self.num_samples > 1 and self.greedy:
            problems.append(
                f"--num-samples {self.num_samples} draws several answers per prompt, but greedy "
                "decoding (--temperature 0) gives the same one every time; pass --temperature "
                "0.6 (Open R1's choice) or --num-samples 1"
            )
        if self.keep and not self.verify:
            problems.append("--keep chooses among verified answers: pass --verify math|exact")
        if self.answer_regex is not None:
            try:
                re.compile(self.answer_regex)
            except re.error as exc:
                problems.append(f"--answer-regex is not a valid regex ({exc})")
        if self.logprobs and self.backend in ("distilabel", "transformers"):
            problems.append(
                f"--logprobs: the {self.backend} backend cannot return the teacher's "
                "log-probabilities; use --backend vllm, --backend openai (a vLLM server) or mock"
            )
        if self.vllm_args and not (self.backend == "vllm" or self.serve):
            problems.append("--vllm-args configures a vLLM engine: use --backend vllm or --serve")
        if self.backend == "distilabel" and not self.llm_class:
            problems.append(
                "--backend distilabel needs --llm-class (e.g. distilabel.models.OpenAILLM)"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def shard_index(self) -> tuple[int, int] | None:
        if self.shard is None:
            return None
        i, n = self.shard.split("/")
        return int(i), int(n)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
