"""`openkd decontaminate` settings: one typed field per flag and YAML key."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from openkd.config import StageConfig
from openkd.data.fields import PROMPTS_HELP, MessagesColumn, PromptColumn, Split, Subset

DEFAULT_NGRAM = 8  # Open R1's choice (scripts/decontaminate.py), after s1
DEFAULT_BENCHMARK_COLUMN = "problem"


class Benchmark(BaseModel):
    """One benchmark to check against: where it is, which text columns, which split.

    On the command line `SOURCE[:COLUMNS[:SPLIT[:SUBSET]]]`, e.g.
    `HuggingFaceH4/MATH-500:problem` or `bench/gpqa.jsonl:Question,Answer`; in YAML also a
    mapping with these fields.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(
        description="Local .jsonl/.json/.parquet/.csv file, glob or directory, or Hub id."
    )
    columns: list[str] = Field(
        default_factory=lambda: [DEFAULT_BENCHMARK_COLUMN],
        min_length=1,
        description="Text columns whose n-grams count (each column on its own).",
    )
    split: str | None = Field(
        None, description="Split to read (default: the only split, else 'test')."
    )
    subset: str | None = Field(None, description="Dataset configuration (subset) name.")
    name: str | None = Field(
        None, description="Name in the report and side file (default: the source)."
    )

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        known = _named_fields(value)
        if known is not None:
            return known
        source, *rest = value.split(":")
        if len(rest) > 3:
            raise ValueError(
                f"'{value}' has {len(rest) + 1} ':'-separated parts; a benchmark is "
                "SOURCE[:COLUMNS[:SPLIT[:SUBSET]]], at most 4 (in YAML, a mapping takes a "
                "source with ':' in it)"
            )
        fields: dict[str, Any] = {"source": source}
        if rest and rest[0]:
            fields["columns"] = [c.strip() for c in rest[0].split(",") if c.strip()]
        if len(rest) > 1 and rest[1]:
            fields["split"] = rest[1]
        if len(rest) > 2 and rest[2]:
            fields["subset"] = rest[2]
        return fields

    @field_validator("source")
    @classmethod
    def _nonempty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("a benchmark needs a source: SOURCE[:COLUMNS[:SPLIT[:SUBSET]]]")
        return value

    @property
    def label(self) -> str:
        return self.name or self.source


def _named_fields(value: str) -> dict[str, Any] | None:
    """A benchmark openkd knows by name (`math500`; `math500=PATH` for a local copy) as the
    fields of its problem text; None for any other value."""
    from openkd.data.benchmarks import named

    name, eq, path = value.partition("=")
    bench = named(name)
    if bench is None or (eq and not path.strip()):
        return None
    if eq:
        return {"source": path.strip(), "columns": [bench.problem_column], "name": bench.name}
    return {
        "source": bench.hub_id,
        "columns": [bench.problem_column],
        "split": bench.split,
        "subset": bench.subset,
        "name": bench.name,
    }


class DecontaminateConfig(StageConfig):
    """Drop the prompts that share an n-gram with a benchmark (decontamination, before stage 1)."""

    section: ClassVar[str] = "decontaminate"

    # What to check
    dataset: str = Field(description=PROMPTS_HELP)
    split: Split = "train"
    subset: Subset = None
    prompt_column: PromptColumn = None
    messages_column: MessagesColumn = None
    prompt_template: str | None = Field(
        None,
        description="Jinja template over the row's columns whose rendering is checked, "
        "e.g. '{{ problem }} {{ choices }}'.",
    )
    benchmark: list[Benchmark] = Field(
        min_length=1,
        description="Benchmark to decontaminate against: a name (math500, aime24, aime25, "
        "gpqa-diamond: the Hub dataset and problem column `openkd eval --benchmark` uses; "
        "NAME=PATH for a local copy), or SOURCE[:COLUMNS[:SPLIT[:SUBSET]]]: "
        "a local file/glob/directory or Hub id; comma-separated text columns (default "
        f"'{DEFAULT_BENCHMARK_COLUMN}'); split (default: its only split, else 'test'); e.g. "
        "HuggingFaceH4/MATH-500:problem. In YAML also a mapping of source, columns, split, "
        "subset, name.",
    )
    ngram_size: int = Field(
        DEFAULT_NGRAM,
        description="Words per n-gram: a prompt sharing any run of this many words with a "
        "benchmark text (after normalising case, punctuation and spacing) is dropped.",
    )

    # Where it goes
    output: Path = Field(
        description="JSONL file for the kept rows (all columns); dropped rows go to "
        "<stem>.contaminated.jsonl with the benchmark and the shared n-gram, counts to "
        "<stem>.meta.json."
    )
    overwrite: bool = Field(False, description="Replace --output and its side files if they exist.")

    @field_validator("ngram_size")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"must be at least 1, got {value} (Open R1 uses {DEFAULT_NGRAM})")
        return value

    @field_validator("output")
    @classmethod
    def _jsonl(cls, value: Path) -> Path:
        if value.suffix != ".jsonl":
            raise ValueError(f"'{value}' must be a .jsonl file, e.g. {value.with_suffix('.jsonl')}")
        return value

    @model_validator(mode="after")
    def _check(self) -> DecontaminateConfig:
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
        labels = [b.label for b in self.benchmark]
        twice = sorted({label for label in labels if labels.count(label) > 1})
        if twice:
            problems.append(
                f"--benchmark {', '.join(twice)} is given more than once; list it once with all "
                "its columns (SOURCE:COL1,COL2), or give each a different `name:` in YAML"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self
