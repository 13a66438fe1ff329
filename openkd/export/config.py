"""`openkd export` settings: one typed field per flag and YAML key."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from openkd.config import StageConfig

FORMATS = ("axolotl-kd", "distillkit", "parquet")


class ExportConfig(StageConfig):
    """Write a generate output's teacher labels and top-k log-probabilities in another trainer's
    format: axolotl's KD dataset, DistillKit's compressed Parquet, or plain Parquet."""

    section: ClassVar[str] = "export"

    input: Path = Field(
        description="A JSONL file `openkd generate --logprobs K` wrote (its <stem>.logprobs/ "
        "sidecar beside it), e.g. data/teacher.jsonl or data/teacher.eval.jsonl."
    )
    format: Literal["axolotl-kd", "distillkit", "parquet"] = Field(
        description="axolotl-kd: axolotl's KD plugin dataset (messages + target_token_ids/"
        "target_logprobs); distillkit: DistillKit's compressed Parquet + compression_config.yaml; "
        "parquet: plain rows with the top-k as list columns."
    )
    output: Path = Field(
        description="Directory to write (Parquet files, the format's config, a README.md card)."
    )
    tokenizer: str | None = Field(
        None,
        description="axolotl-kd, distillkit: the tokenizer (and chat template) that renders the "
        "prompts into token ids (a model directory, or a cached Hub id offline) [default: the "
        "teacher named in the input's <stem>.meta.json].",
    )
    top_k: int | None = Field(
        None,
        description="Write each position's top-N of the sidecar's K [default: all K; for "
        "distillkit, the k of --distillkit-config].",
    )
    distillkit_config: Path | None = Field(
        None,
        description="distillkit: a compression_config.yaml (DistillKit's keys: d, k, exact_k, "
        "exact_dtype, polynomial_terms, term_dtype, residual_bins, delta_encoding, ...) "
        "[default: exact values for K <= 32; above, the top 16 exact and a polynomial tail].",
    )
    rows_per_file: int = Field(10_000, description="Rows per Parquet file.")
    trust_remote_code: bool = Field(
        False, description="Allow custom tokenizer code from the Hub (--tokenizer)."
    )
    overwrite: bool = Field(
        False, description="Replace an export at --output (only one `openkd export` wrote)."
    )

    @field_validator("input")
    @classmethod
    def _jsonl(cls, value: Path) -> Path:
        if value.suffix != ".jsonl":
            raise ValueError(f"'{value}' must be a .jsonl file that `openkd generate` wrote")
        return value

    @field_validator("top_k", "rows_per_file")
    @classmethod
    def _positive(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"must be at least 1, got {value}")
        return value

    @model_validator(mode="after")
    def _check(self) -> ExportConfig:
        problems: list[str] = []
        if self.distillkit_config is not None and self.format != "distillkit":
            problems.append("--distillkit-config applies to --format distillkit")
        if self.distillkit_config is not None and self.top_k is not None:
            problems.append("--distillkit-config sets k; drop --top-k")
        if self.tokenizer is not None and self.format == "parquet":
            problems.append("--tokenizer applies to --format axolotl-kd|distillkit")
        if problems:
            raise ValueError("; ".join(problems))
        return self
