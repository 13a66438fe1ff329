"""What benchmark mode scores: each `--benchmark` (or a gold-answer `--dataset`) resolved to its
rows, prompts and gold answers, and a record of how it was resolved for the report.

A spec is a named benchmark (`math500`, see `openkd.data.benchmarks`), `NAME=PATH` (a named
benchmark read from a local copy: same prompt and answer check), or
`SOURCE[:PROMPT_COLUMN[,GOLD_COLUMN][:SPLIT[:SUBSET]]]`, parsed like `openkd decontaminate
--benchmark` (`openkd.decontaminate.config.Benchmark`) with the columns read as prompt and gold.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from openkd import console
from openkd.data.benchmarks import NamedBenchmark, named, names, unknown_name_hint
from openkd.data.prompts import PromptBuilder
from openkd.data.schema import Message
from openkd.data.sources import BUILDERS, iter_rows, selection
from openkd.errors import ConfigError, OpenkdError, brief
from openkd.paths import looks_like_path
from openkd.verify import VerifyKind

if TYPE_CHECKING:
    from datasets import Dataset

    from openkd.eval.config import EvalConfig

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


@dataclass(frozen=True)
class Task:
    """One benchmark as resolved: where its rows are, how a row is prompted and graded."""

    name: str  # in the report and examples.jsonl
    source: str  # Hub id or local path
    split: str | None
    subset: str | None
    prompt_column: str
    gold_column: str | None  # None: the named benchmark builds the gold (multiple choice)
    verify: VerifyKind
    answer_regex: str | None
    named: NamedBenchmark | None = None
    local_copy: bool = False

    def resolution(self) -> dict[str, Any]:
        """How the spec was resolved, as recorded in report.json."""
        out: dict[str, Any] = {
            "source": self.source,
            "local_copy": self.local_copy,
            "split": self.split,
            "subset": self.subset,
            "prompt_column": self.prompt_column,
            "gold_column": self.gold_column,
            "verify": self.verify,
            "answer_regex": self.answer_regex,
        }
        if self.named is not None:
            bench = self.named
            out["hub_id"] = bench.hub_id
            out["as_in"] = f"lighteval {bench.lighteval} (Open R1's evaluate.py)"
            out["prompt_template"] = bench.template
            if bench.answer == "choice":
                out["gold"] = (
                    "the letter of the correct option after the four are shuffled (each row's "
                    "order seeded by its row number)"
                )
        return out

    def describe(self) -> str:
        """One line for the log: what is read and how it is graded."""
        where = self.source + (f" ({self.subset})" if self.subset else "")
        where += f", split {self.split}" if self.split else ""
        how = "math-verify" if self.verify == "math" else "exact match of the extracted answer"
        if self.named is not None:
            prompt = f"lighteval {self.named.lighteval} prompt"
        else:
            prompt = f"prompt column '{self.prompt_column}'"
        gold = f"gold column '{self.gold_column}'" if self.gold_column else "gold: option letter"
        return f"{self.name}: {where}; {prompt}, {gold}, {how}"


@dataclass(frozen=True)
class Item:
    """One problem: its id, the conversation the model answers, the gold final answer."""

    id: str
    row: int
    prompt: list[Message]
    gold: str


@dataclass
class Loaded:
    task: Task
    items: list[Item]
    without_gold: int  # selected rows with an empty or missing gold answer: not scored


# --- specs -------------------------------------------------------------------------------


def spec_problems(specs: list[str]) -> list[str]:
    """What is wrong with `--benchmark` values, for the config's validator (data is read later):
    malformed specs, and one benchmark named twice."""
    problems, seen = [], set()
    for spec in specs:
        try:
            task = parse_spec(
                spec, prompt_column="prompt", answer_column="answer", answer_regex=None
            )
        except (ConfigError, ValueError) as exc:
            problems.append(str(exc))
            continue
        if task.name in seen:
            problems.append(f"--benchmark {task.name} is given twice; list each benchmark once")
        seen.add(task.name)
    return problems


def parse_spec(
    spec: str, *, prompt_column: str, answer_column: str, answer_regex: str | None
) -> Task:
    """The Task a `--benchmark` value names; ConfigError (one line) for a malformed one."""
    text = spec.strip()
    name, eq, path = text.partition("=")
    bench = named(name)
    if eq and bench is not None:
        if not path.strip():
            raise ConfigError(f"--benchmark {spec}: NAME=PATH needs a path after '='")
        return _named_task(bench, source=path.strip(), local=True)
    if bench is not None:
        return _named_task(bench, source=bench.hub_id, local=False)
    return _custom_task(text, prompt_column, answer_column, answer_regex)


def _named_task(bench: NamedBenchmark, *, source: str, local: bool) -> Task:
    return Task(
        name=bench.name,
        source=source,
        split=None if local else bench.split,
        subset=None if local else bench.subset,
        prompt_column=bench.problem_column,
        gold_column=bench.gold_column,
        verify="exact" if bench.answer == "choice" else "math",
        answer_regex=bench.answer_regex,
        named=bench,
        local_copy=local,
    )


def _custom_task(
    text: str, prompt_column: str, answer_column: str, answer_regex: str | None
) -> Task:
    from pydantic import ValidationError

    from openkd.config import describe_validation_error
    from openkd.decontaminate.config import Benchmark

    source = text.split(":", 1)[0]
    local = Path(source).suffix.lower() in BUILDERS or looks_like_path(source)
    if not local and "/" not in source and ":" not in text:
        raise ConfigError(
            f"--benchmark {text}: no benchmark has this name{unknown_name_hint(text)}; name one "
            f"of {names()}, or pass a file or Hub dataset as SOURCE[:PROMPT_COLUMN[,GOLD_COLUMN]"
            "[:SPLIT[:SUBSET]]]"
        )
    try:
        parsed = Benchmark.model_validate(text)
    except ValidationError as exc:
        raise ConfigError(f"--benchmark {text}: {describe_validation_error(exc)}") from exc
    columns = parsed.columns if "columns" in parsed.model_fields_set else [prompt_column]
    if len(columns) > 2:
        raise ConfigError(
            f"--benchmark {text}: {len(columns)} columns given; name the prompt column and the "
            "gold-answer column: SOURCE:PROMPT_COLUMN,GOLD_COLUMN"
        )
    return Task(
        name=parsed.source,
        source=parsed.source,
        split=parsed.split,
        subset=parsed.subset,
        prompt_column=columns[0],
        gold_column=columns[1] if len(columns) > 1 else answer_column,
        verify="exact" if answer_regex else "math",
        answer_regex=answer_regex,
    )


def resolve(cfg: EvalConfig) -> list[Task]:
    """Every benchmark the run scores: the `--benchmark` specs, or `--dataset` as one."""
    if cfg.benchmark:
        return [
            parse_spec(
                spec,
                prompt_column=cfg.prompt_column,
                answer_column=cfg.answer_column,
                answer_regex=cfg.answer_regex,
            )
            for spec in cfg.benchmark
        ]
    assert cfg.dataset is not None
    return [
        Task(
            name=cfg.dataset,
            source=cfg.dataset,
            split=cfg.split,
            subset=cfg.subset,
            prompt_column=cfg.prompt_column,
            gold_column=cfg.answer_column,
            verify="exact" if cfg.answer_regex else "math",
            answer_regex=cfg.answer_regex,
        )
    ]


# --- rows --------------------------------------------------------------------------------


def load(task: Task, cfg: EvalConfig) -> Loaded:
    """The task's selected rows as Items (first --max-samples rows); rows without a gold
    answer are counted and left out; OpenkdError naming what is missing and the fix."""
    dataset = _open(task, cfg)
    columns = list(dataset.column_names)
    wanted = task.named.columns if task.named else [task.prompt_column, task.gold_column]
    missing = [c for c in dict.fromkeys(wanted) if c is not None and c not in columns]
    if missing:
        raise OpenkdError(
            f"{_flag(task, cfg)} has no column {', '.join(map(repr, missing))} (columns are: "
            f"{', '.join(columns[:30])}); {_column_fix(task, cfg)}"
        )
    builder = PromptBuilder(
        columns=columns,
        source=task.source,
        prompt_column=task.prompt_column,
        system_prompt=cfg.system_prompt,
        alternatives="",
    )
    read = [c for c in dict.fromkeys([*wanted, "id"]) if c in columns]
    positions = selection(len(dataset), max_samples=cfg.max_samples, shuffle_seed=None)
    items: list[Item] = []
    without_gold = 0
    for rows in iter_rows(dataset, positions, read, batch_size=1024):
        for index, row in rows:
            item = _item(task, builder, row, index, cfg.system_prompt)
            if item is None:
                without_gold += 1
            else:
                items.append(item)
    if not items:
        raise OpenkdError(
            f"{_flag(task, cfg)}: none of its {without_gold:,} rows has a gold answer in "
            f"'{task.gold_column}'; {_column_fix(task, cfg)}"
        )
    if without_gold:
        console.warn(
            f"{task.name}: {without_gold:,} of {without_gold + len(items):,} rows have no gold "
            f"answer in '{task.gold_column}'; they are left out of every score"
        )
    return Loaded(task, items, without_gold)


def _item(
    task: Task,
    builder: PromptBuilder,
    row: dict[str, Any],
    index: int,
    system_prompt: str | None,
) -> Item | None:
    row_id = str(row.get("id") or index)
    if task.named is not None:
        text, gold = task.named.prompt_and_gold(row, index)
        messages = [Message(role="user", content=text)]
        if system_prompt is not None:
            messages.insert(0, Message(role="system", content=system_prompt))
        return Item(row_id, index, messages, gold) if gold else None
    assert task.gold_column is not None
    value = row.get(task.gold_column)
    gold = "" if value is None else str(value).strip()
    if not gold:
        return None
    return Item(row_id, index, builder.build(row, index), gold)


def _flag(task: Task, cfg: EvalConfig) -> str:
    return f"--benchmark {task.name}" if cfg.benchmark else f"--dataset {task.source}"


def _column_fix(task: Task, cfg: EvalConfig) -> str:
    if task.named is not None:
        return f"a copy of {task.named.hub_id} needs its columns as they are on the Hub"
    if cfg.benchmark:
        return f"name them as {task.source}:PROMPT_COLUMN,GOLD_COLUMN"
    return "pass --prompt-column NAME and --answer-column NAME (the gold answers)"


def _open(task: Task, cfg: EvalConfig) -> Dataset:
    """The task's rows: a local file or folder, or the Hub (cached copies included)."""
    from openkd.data.sources import load_source
    from openkd.decontaminate.benchmarks import load_benchmark
    from openkd.decontaminate.config import Benchmark

    if not cfg.benchmark:
        return load_source(task.source, split=cfg.split, subset=cfg.subset)
    if task.named is not None and not task.local_copy:
        return _from_hub(task, task.named)
    bench = Benchmark(source=task.source, split=task.split, subset=task.subset, name=task.name)
    return load_benchmark(bench)[0]


def _from_hub(task: Task, bench: NamedBenchmark) -> Dataset:
    import logging

    from datasets import load_dataset
    from datasets.utils import logging as ds_logging

    log = logging.getLogger("datasets")
    level, bars = log.level, ds_logging.is_progress_bar_enabled()
    log.setLevel(logging.CRITICAL)
    ds_logging.disable_progress_bar()
    try:
        return load_dataset(bench.hub_id, bench.subset, split=bench.split)
    except Exception as exc:
        offline = [v for v in OFFLINE_VARIABLES if _truthy(os.environ.get(v))]
        why = (
            f"the Hub is off ({offline[0]}=1) and no cached copy was found"
            if offline
            else brief(exc)
        )
        gated = ", and `hf auth login` (it is gated)" if bench.name == "gpqa-diamond" else ""
        raise OpenkdError(
            f"--benchmark {bench.name}: could not load {bench.hub_id} (split {bench.split}) "
            f"from the Hub ({why}); check your network{gated}, or pass a local copy as "
            f"--benchmark {bench.name}=PATH (a .jsonl/.parquet/.csv file or save_to_disk "
            f"folder with columns {', '.join(bench.columns)})"
        ) from exc
    finally:
        log.setLevel(level)
        if bars:
            ds_logging.enable_progress_bar()


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")
