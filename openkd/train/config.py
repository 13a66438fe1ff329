"""`openkd train` settings: one typed field per flag and YAML key.

Defaults are openkd's own, not SFTConfig's: SFTConfig turns on bf16 and gradient
checkpointing by default, which fail or slow down on CPUs and small students.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from openkd.config import MAX_TOKENS, StageConfig, cli_only
from openkd.engine import TRUST_REMOTE_CODE


class TrainConfig(StageConfig):
    """Fine-tune a student on the teacher's answers with TRL SFT (stage 2)."""

    section: ClassVar[str] = "train"

    # What to train on
    student: str = Field(description="Student model: local path or Hub id.")
    dataset: str = Field(
        description="What `openkd generate` wrote: JSONL file, folder of shards, "
        "save_to_disk directory, or Hub id."
    )
    output_dir: Path = Field(
        Path("outputs/student"), description="Checkpoints and the final student go here."
    )
    eval_dataset: str | None = Field(None, description="Held-out openkd dataset for evaluation.")
    eval_fraction: float = Field(
        0.0, ge=0.0, lt=1.0, description="Hold out this share of --dataset for evaluation."
    )
    keep_truncated: bool = Field(
        False,
        description="Also train on answers the teacher did not finish (finish_reason=length) "
        "or left empty.",
    )
    max_samples: int | None = Field(None, gt=0, description="Train on at most this many rows.")
    chat_template: str | None = Field(
        None, description="Jinja chat template file for a student without one (base models)."
    )
    eos_token: str | None = Field(
        None,
        description="Make this token the student's EOS (tokenizer, config, generation_config), "
        "e.g. the chat template's end-of-turn token when the two differ.",
    )
    trust_remote_code: bool = TRUST_REMOTE_CODE

    # Optimisation
    max_length: int = Field(
        2048, gt=0, le=MAX_TOKENS, description="Longest tokenised example; longer are cut."
    )
    packing: bool = Field(False, description="Pack examples into --max-length rows (TRL bfd).")
    learning_rate: float = Field(2e-5, gt=0, description="Peak learning rate.")
    lr_scheduler_type: str = Field("cosine", description="Learning-rate schedule.")
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0, description="Share of steps for warmup.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    epochs: float = Field(
        1.0, gt=0, le=10_000, description="Passes over the data (ignored with --max-steps)."
    )
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps.")
    batch_size: int = Field(8, gt=0, description="Examples per device per step.")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-batches per step.")
    bf16: bool | None = Field(
        None, description="Train in bfloat16 (default: on when a bf16-capable GPU is present)."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations to save memory (slower)."
    )
    seed: int = Field(
        42,
        ge=0,
        le=2**32 - 1,
        description="Seed for data order and initialisation (0 to 2^32-1: numpy's seed range).",
    )

    # Soft labels (the teacher's top-k log-probabilities)
    loss: Literal["hard", "soft", "mix", "on-policy"] = Field(
        "hard",
        description="hard: cross-entropy on the teacher's answer; soft: KL to the teacher's "
        "top-k log-probabilities (`openkd generate --logprobs K`) with the rest of its "
        "probability as one bucket; mix: --kd-alpha * hard + (1 - --kd-alpha) * soft; "
        "on-policy: the student samples answers to the prompts and learns --teacher's "
        "per-token distribution on them (TRL DistillationTrainer).",
    )
    kd_alpha: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="--loss mix: weight of the hard-label cross-entropy (the soft term gets "
        "1 - alpha) [default: 0.5].",
    )
    kd_temperature: float | None = Field(
        None,
        gt=0.0,
        description="--loss soft|mix: temperature T of the KL term (student logits and the "
        "teacher's log-probabilities divided by T, the KL scaled by T^2); --loss on-policy: "
        "both models' logits are divided by T in the divergence (not scaled) [default: 1].",
    )
    logprobs: str | None = Field(
        None,
        description="--loss soft|mix: the teacher's log-probability sidecar directory, or an "
        "axolotl-kd / DistillKit / Parquet set (`openkd export`), matched with --dataset by id "
        "[default: <dataset stem>.logprobs/ beside --dataset and --eval-dataset].",
    )
    cross_tokenizer: Literal["auto", "gold", "uld", "off"] | None = Field(
        None,
        description="--loss soft|mix when the teacher's tokenizer differs from the student's: "
        "gold aligns the two by the text they cover (exact, merged and ULD targets, "
        "openkd.distill.crosstok), uld matches sorted probabilities only, off refuses; auto is "
        "gold when the vocabularies differ, plain soft labels when they match; --loss "
        "on-policy: the same choice with TRL's GOLD trainer [default: auto].",
    )
    cross_tokenizer_min_coverage: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="--loss soft|mix across tokenizers: refuse when fewer than this share of the "
        "first rows' answer tokens get a teacher target (0 trains anyway) [default: 0.5].",
    )

    # On-policy distillation (--loss on-policy): the student's own samples, scored by a teacher
    teacher: str | None = Field(
        None,
        description="--loss on-policy: the teacher (local path or Hub id), loaded in the training "
        "process(es) beside the student; another tokenizer than the student's trains with "
        "TRL's GOLD trainer (--cross-tokenizer).",
    )
    teacher_base_url: str | None = Field(
        None,
        description="--loss on-policy: score with a running OpenAI-compatible vLLM server of "
        "--teacher at this URL (e.g. http://node1:8000/v1) instead of loading it here; the loss "
        "is then over the sampled token plus a tail bucket (TRL's server distillation).",
    )
    teacher_serve: bool = Field(
        False,
        description="--loss on-policy: start `vllm serve` for --teacher as a child process, "
        "score with it as with --teacher-base-url, and stop it at the end.",
    )
    teacher_serve_args: list[str] | None = Field(
        None,
        description="--teacher-serve: extra `vllm serve` flags, e.g. '--tensor-parallel-size 4' "
        "(repeatable).",
    )
    kd_beta: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="--loss on-policy: the divergence: 1 reverse KL(student || teacher), 0 forward "
        "KL(teacher || student), in between the generalized JSD [default: 1].",
    )
    kd_lambda: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="--loss on-policy: GKD's lambda, the share of optimizer steps on the "
        "student's own samples; the other steps score the dataset's answers (the `completion` "
        "column) with the same divergence [default: 1, every step on-policy].",
    )
    max_completion_length: int | None = Field(
        None,
        gt=0,
        le=MAX_TOKENS,
        description="--loss on-policy: longest answer the student samples, in tokens "
        "(prompts longer than --max-length minus this are dropped) [default: 512].",
    )
    num_samples: int | None = Field(
        None,
        gt=0,
        le=1024,
        description="--loss on-policy: answers sampled per prompt in a step; they count in "
        "--batch-size [default: 1].",
    )
    sampling_temperature: float | None = Field(
        None,
        gt=0.0,
        description="--loss on-policy: temperature the student samples its answers with "
        "[default: 1].",
    )
    sampling_top_p: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="--loss on-policy: nucleus sampling of the student's answers [default: 1].",
    )

    # LoRA
    lora: bool = Field(False, description="Train a LoRA adapter instead of all weights (PEFT).")
    lora_r: int = Field(16, gt=0, le=4096, description="LoRA rank.")
    lora_alpha: int = Field(32, gt=0, description="LoRA alpha.")
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0, description="LoRA dropout.")
    lora_target_modules: list[str] | None = Field(
        None, description="Module name LoRA wraps (default: all linear layers)."
    )
    merge_lora: bool = Field(
        False, description="Also save the adapter merged into the base weights (<output>/merged)."
    )

    # Checkpoints and logging
    save_steps: int = Field(500, gt=0, description="Save a checkpoint every this many steps.")
    save_total_limit: int | None = Field(2, gt=0, description="Keep only this many checkpoints.")
    logging_steps: int = Field(10, gt=0, description="Log loss every this many steps.")
    eval_steps: int | None = Field(None, gt=0, description="Evaluate every this many steps.")
    resume: str = Field(
        "auto",
        description="auto: newest valid checkpoint in --output-dir; no: start fresh; "
        "or a checkpoint path.",
    )
    overwrite: bool = Field(
        False, description="Replace --output-dir even if it holds a different run."
    )
    report_to: str = Field("none", description="Experiment tracker: none, wandb, tensorboard...")
    push_to_hub: str | None = Field(
        None,
        description="Push the final student to this Hub repo (with --lora: the adapter, or the "
        "merged model with --merge-lora).",
    )
    private: bool = Field(False, description="Make the Hub model repo private.")

    # Scale-out
    accelerate_config: str | None = Field(
        None,
        description="accelerate config: a path or a shipped name (zero3, zero3_offload, zero2, ddp).",
    )
    deepspeed: str | None = Field(
        None, description="Shortcut for --accelerate-config with a shipped DeepSpeed config."
    )
    num_processes: int | None = Field(
        None,
        gt=0,
        le=4096,
        description="Processes for `accelerate launch` (default: the config's).",
    )

    sft_args: dict[str, Any] = Field(
        default_factory=dict,
        description="Any other trl.SFTConfig field (YAML only), e.g. {max_grad_norm: 0.5}.",
        json_schema_extra=cli_only(),
    )

    @field_validator("resume")
    @classmethod
    def _resume(cls, value: str) -> str:
        low = value.lower()
        if low in {"auto", "no", "true", "false", "none"}:
            return {"true": "auto", "false": "no", "none": "no"}.get(low, low)
        return value

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        problems: list[str] = []
        if self.eval_dataset and self.eval_fraction:
            problems.append("pass either --eval-dataset or --eval-fraction, not both")
        if self.accelerate_config and self.deepspeed:
            problems.append("pass either --accelerate-config or --deepspeed, not both")
        if self.merge_lora and not self.lora:
            problems.append("--merge-lora needs --lora")
        problems += self._soft_label_problems()
        problems += self._on_policy_problems()
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def soft_labels(self) -> bool:
        """True when training reads the teacher's log-probabilities (--loss soft or mix)."""
        return self.loss in ("soft", "mix")

    @property
    def on_policy(self) -> bool:
        """True for --loss on-policy: the student samples, the teacher scores."""
        return self.loss == "on-policy"

    @property
    def alpha(self) -> float:
        """Weight of the hard-label cross-entropy: 1 for hard, 0 for soft, --kd-alpha for mix."""
        if self.loss == "mix":
            return 0.5 if self.kd_alpha is None else self.kd_alpha
        return 1.0 if self.loss == "hard" else 0.0

    @property
    def temperature(self) -> float:
        return 1.0 if self.kd_temperature is None else self.kd_temperature

    def _soft_label_problems(self) -> list[str]:
        problems: list[str] = []
        if self.kd_alpha is not None and self.loss != "mix":
            problems.append(
                f"--kd-alpha weighs the two terms of --loss mix; --loss {self.loss} is alpha "
                f"{self.alpha:g} (drop --kd-alpha or pass --loss mix)"
            )
        if not self.soft_labels:
            for name, value in (
                ("kd_temperature", None if self.on_policy else self.kd_temperature),
                ("logprobs", self.logprobs),
                ("cross_tokenizer", None if self.on_policy else self.cross_tokenizer),
                ("cross_tokenizer_min_coverage", self.cross_tokenizer_min_coverage),
            ):
                if value is not None:
                    problems.append(
                        f"--{name.replace('_', '-')} applies to --loss soft|mix"
                        + ("|on-policy" if name in ("kd_temperature", "cross_tokenizer") else "")
                        + f" only (drop it or pass another --loss than {self.loss})"
                    )
            return problems
        if self.packing:
            problems.append(
                f"--packing does not work with --loss {self.loss}: packed rows lose track of "
                "each row's teacher log-probabilities; drop --packing or use --loss hard"
            )
        for key in ("padding_free", "loss_type", "label_smoothing_factor", "use_liger_kernel"):
            if self.sft_args.get(key) not in (None, False, 0, "nll"):
                problems.append(
                    f"sft_args.{key} changes TRL's own loss, which --loss {self.loss} replaces; "
                    "drop it or use --loss hard"
                )
        return problems

    def _on_policy_problems(self) -> list[str]:
        names = (
            "teacher",
            "teacher_base_url",
            "teacher_serve_args",
            "kd_beta",
            "kd_lambda",
            "max_completion_length",
            "num_samples",
            "sampling_temperature",
            "sampling_top_p",
        )
        if not self.on_policy:
            return [
                f"--{name.replace('_', '-')} applies to --loss on-policy only (drop it or pass "
                "--loss on-policy)"
                for name in (*names, "teacher_serve")
                if getattr(self, name) not in (None, False)
            ]
        problems: list[str] = []
        if not self.teacher:
            problems.append("--loss on-policy needs --teacher MODEL (the model that scores)")
        problems += self._served_teacher_problems()
        if self.packing:
            problems.append(
                "--packing does not work with --loss on-policy: the student samples its own "
                "answers each step, there are no fixed examples to pack; drop --packing"
            )
        if self.completion_tokens >= self.max_length:
            problems.append(
                f"--max-completion-length {self.completion_tokens} leaves no room for a prompt "
                f"in --max-length {self.max_length}; raise --max-length or lower "
                "--max-completion-length"
            )
        if (self.batch_size * self.gradient_accumulation_steps) % self.samples_per_prompt:
            problems.append(
                f"--num-samples {self.samples_per_prompt} must divide --batch-size x "
                f"--gradient-accumulation-steps ({self.batch_size} x "
                f"{self.gradient_accumulation_steps}): a step samples each of its prompts "
                "--num-samples times"
            )
        return problems

    def _served_teacher_problems(self) -> list[str]:
        from openkd.teacher.served import url_problem

        problems: list[str] = []
        if self.teacher_base_url and self.teacher_serve:
            problems.append(
                "pass either --teacher-base-url (a server already running) or --teacher-serve "
                "(openkd starts one), not both"
            )
        if self.teacher_base_url:
            problem = url_problem(self.teacher_base_url)
            if problem:
                problems.append(f"--teacher-base-url {self.teacher_base_url}: {problem}")
        if self.teacher_serve_args and not self.teacher_serve:
            problems.append("--teacher-serve-args configures --teacher-serve's server; add it")
        return problems

    @property
    def served_teacher(self) -> bool:
        """--loss on-policy with the teacher behind a vLLM server (--teacher-base-url/-serve)."""
        return self.on_policy and bool(self.teacher_base_url or self.teacher_serve)

    @property
    def beta(self) -> float:
        """--loss on-policy: TRL's beta (1 reverse KL, 0 forward KL, between: JSD)."""
        return 1.0 if self.kd_beta is None else self.kd_beta

    @property
    def lmbda(self) -> float:
        """--loss on-policy: the share of optimizer steps on the student's own samples."""
        return 1.0 if self.kd_lambda is None else self.kd_lambda

    @property
    def completion_tokens(self) -> int:
        return 512 if self.max_completion_length is None else self.max_completion_length

    @property
    def samples_per_prompt(self) -> int:
        return 1 if self.num_samples is None else self.num_samples
