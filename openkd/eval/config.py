"""`openkd eval` settings: one typed field per flag and YAML key."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from openkd.config import INT64_MAX, MAX_TOKENS
from openkd.data.benchmarks import names as benchmark_names
from openkd.data.fields import Split, Subset
from openkd.engine import EngineConfig
from openkd.generate.config import Backend

DEFAULT_MAX_NEW_TOKENS = 4096
# Backends that can load a student (mock and distilabel answer as a teacher only).
StudentBackend = Literal["vllm", "openai", "transformers"]


class EvalConfig(EngineConfig):
    """Score a student against its teacher on held-out prompts, or on benchmarks' gold answers
    (MATH-500, AIME, GPQA: pass@1, pass@k) with no teacher (stage 3)."""

    section: ClassVar[str] = "eval"

    # What to compare
    student: str = Field(description="Student model to score: local path or Hub id.")
    dataset: str | None = Field(
        None,
        description="Held-out prompts, normally the <stem>.eval.jsonl `openkd generate` wrote "
        "(JSONL, save_to_disk directory or Hub id); or a benchmark file with gold answers "
        "(see --mode). Required unless --benchmark is given.",
    )
    benchmark: list[str] | None = Field(
        None,
        description="Score final-answer accuracy on a benchmark's gold answers, no teacher "
        f"needed (repeat for several): {benchmark_names()} (lighteval's / Open R1's Hub "
        "dataset, prompt and answer check), NAME=PATH for a local copy of one, or "
        "SOURCE[:PROMPT_COLUMN[,GOLD_COLUMN][:SPLIT[:SUBSET]]] for any other file or Hub "
        "dataset (default columns: --prompt-column, --answer-column).",
    )
    mode: Literal["auto", "agreement", "benchmark"] = Field(
        "auto",
        description="agreement: compare with the teacher's answers (--reference-column or "
        "--teacher); benchmark: final-answer accuracy against gold answers (--answer-column), "
        "pass@1 and pass@k; auto: benchmark with --benchmark, or when --dataset has the gold "
        "column but not the reference column and no --teacher is given.",
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
    num_samples: int = Field(
        1,
        ge=1,
        le=1000,
        description="Benchmark mode: answers per prompt; pass@1 is their mean accuracy and "
        "pass@k the unbiased estimate from them (needs --temperature > 0).",
    )
    temperature: float = Field(
        0.0,
        ge=0.0,
        description="Benchmark mode: sampling temperature (0 is greedy; Open R1 samples "
        "reasoning models at 0.6 with --top-p 0.95). Agreement with the teacher is always "
        "scored on greedy answers.",
    )
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Benchmark mode: nucleus cut-off.")
    seed: int = Field(
        0, description="Benchmark mode: sampling seed (sample i of a prompt: seed + i)."
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

    # On-policy: the reverse KL to a teacher on each model's own samples
    on_policy_teacher: str | None = Field(
        None,
        description="Also report each model's per-token reverse KL(model || this teacher) on "
        "its own sampled answers, exact over the vocabulary (what `openkd train --loss "
        "on-policy` minimises); the teacher runs here (transformers) and must share the "
        "student's tokenizer.",
    )
    on_policy_teacher_base_url: str | None = Field(
        None,
        description="--on-policy-teacher: score with a running vLLM server of that teacher at "
        "this URL (as `openkd train --teacher-base-url`); the reverse KL is then over the "
        "sampled token plus a tail bucket (reported as on_policy_reverse_kl_top1_tail).",
    )
    on_policy_samples: int = Field(
        4, ge=1, le=1000, description="--on-policy-teacher: answers sampled per prompt."
    )
    on_policy_temperature: float = Field(
        1.0, gt=0.0, description="--on-policy-teacher: temperature the models sample with."
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
        if (
            self.teacher is None
            and not self.benchmark
            and self.reference_column == self.prompt_column
        ):
            problems.append(
                f"--reference-column {self.reference_column} is also the --prompt-column: the "
                "reference is the teacher's answer, not the prompt; pass the column with the "
                "teacher's answers (default completion), or --teacher MODEL"
            )
        if self.stop and "" in self.stop:
            problems.append("--stop '' is empty and would stop nothing; drop it")
        problems += self._benchmark_problems()
        if self.on_policy_teacher_base_url:
            from openkd.teacher.served import url_problem

            problem = url_problem(self.on_policy_teacher_base_url)
            if not self.on_policy_teacher:
                problem = "it needs --on-policy-teacher MODEL (the served model's name or path)"
            if problem:
                problems.append(
                    f"--on-policy-teacher-base-url {self.on_policy_teacher_base_url}: {problem}"
                )
        if self.answer_regex is not None:
            import re

            try:
                re.compile(self.answer_regex)
            except re.error as exc:
                problems.append(f"--answer-regex is not a valid regex ({exc})")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _benchmark_problems(self) -> list[str]:
        """What is wrong with the benchmark-mode settings (their syntax; data is read later)."""
        from openkd.eval.tasks import spec_problems

        problems: list[str] = []
        if self.dataset is None and not self.benchmark:
            problems.append(
                "--dataset is required (the held-out prompts), or --benchmark NAME to score on "
                f"a benchmark's gold answers ({benchmark_names()})"
            )
        if self.dataset is not None and self.benchmark:
            problems.append(
                "pass --dataset or --benchmark, not both: to score a local file with gold "
                "answers next to benchmarks, pass it as --benchmark FILE:PROMPT_COLUMN,GOLD_COLUMN"
            )
        if self.benchmark and self.mode == "agreement":
            problems.append(
                "--benchmark scores gold answers, --mode agreement the teacher's: drop one"
            )
        problems += spec_problems(self.benchmark or [])
        sampled = self.num_samples > 1 or self.temperature > 0
        if self.num_samples > 1 and self.temperature == 0.0:
            problems.append(
                f"--num-samples {self.num_samples} draws several answers per prompt, but greedy "
                "decoding (--temperature 0) gives the same one every time; pass --temperature "
                "0.6 (Open R1's choice) or --num-samples 1"
            )
        elif sampled and self.mode == "agreement":
            problems.append(
                "--num-samples and --temperature apply to benchmark mode; agreement with the "
                "teacher is scored on greedy answers: drop them or pass --mode benchmark"
            )
        if self.seed + self.num_samples - 1 > INT64_MAX:
            problems.append(
                f"--seed {self.seed}: sample {self.num_samples - 1} of a prompt gets seed + "
                f"{self.num_samples - 1}, which does not fit a 64-bit integer; pass a smaller seed"
            )
        return problems

    def backends(self) -> dict[str, str]:
        """Which backend answers for each model that generates: student, base, live teacher."""
        out: dict[str, str] = {"student": self.backend}
        if self.base:
            out["base"] = self.backend
        if self.teacher:
            out["teacher"] = self.teacher_backend or self.backend
        return out
