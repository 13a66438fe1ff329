"""Open a prompt dataset through `datasets`, wherever it lives, as a memory-mapped Arrow table.

SOURCE is a Hub dataset id, a local .jsonl/.json/.parquet/.csv/.arrow file or glob, or a
directory (written by `save_to_disk`, or holding data files). Rows are never materialised
all at once: callers iterate them in batches with `iter_rows`.

`datasets` reports a malformed JSON line as "An error occurred while generating the dataset"
and silently accepts non-UTF-8 bytes, so local JSON files are checked here first and any
problem is named by file and line.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from openkd.data.jsonl import iter_jsonl
from openkd.data.layout import is_side_file
from openkd.data.prompts import PromptBuilder
from openkd.errors import ConfigError, OpenkdError, brief
from openkd.paths import looks_like_path

if TYPE_CHECKING:
    import numpy as np
    from datasets import Dataset

BUILDERS = {
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".arrow": "arrow",
}
SAVE_TO_DISK_MARKERS = ("state.json", "dataset_dict.json", "dataset_info.json")
GLOB_CHARS = "*?["
DEFAULT_SPLIT = "train"  # what `datasets` calls the one split of plain data files


class PromptOptions(Protocol):
    """The options of a command that reads prompts (`openkd.data.fields`)."""

    dataset: str
    split: str
    subset: str | None
    prompt_column: str | None
    messages_column: str | None
    prompt_template: str | None


@dataclass
class Prompts:
    """The dataset, and how a row becomes a conversation; both checked against each other."""

    dataset: Dataset
    builder: PromptBuilder


def load_prompts(opts: PromptOptions, system_prompt: str | None = None) -> Prompts:
    """Open `opts.dataset` and check its columns against the prompt options."""
    dataset = load_source(opts.dataset, split=opts.split, subset=opts.subset)
    builder = PromptBuilder(
        columns=list(dataset.column_names),
        source=opts.dataset,
        prompt_column=opts.prompt_column,
        messages_column=opts.messages_column,
        template=opts.prompt_template,
        system_prompt=system_prompt,
    )
    return Prompts(dataset, builder)


def local_files(spec: str) -> list[Path] | None:
    """The files a local `spec` (file, glob or directory) reads; None for a Hub id."""
    expanded = os.path.expanduser(spec)
    if any(ch in expanded for ch in GLOB_CHARS):
        return sorted(Path(p) for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
    if os.path.isfile(expanded):
        return [Path(expanded)]
    if os.path.isdir(expanded):
        return sorted(p for p in Path(expanded).rglob("*") if p.is_file())
    return None


def source_stamp(spec: str) -> str | None:
    """A fingerprint of a local dataset's files (paths, sizes, modification times), taken without
    reading them; None for a Hub dataset. Equal stamps mean the files were not changed."""
    import hashlib

    files = local_files(spec)
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        st = path.stat()
        digest.update(f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def require_source(spec: str, flag: str = "--dataset") -> None:
    """Cheap, before anything heavy: a path-like or file-like dataset must exist."""
    expanded = os.path.expanduser(spec)
    if any(ch in expanded for ch in GLOB_CHARS):
        return
    if (looks_like_path(spec) or Path(expanded).suffix in BUILDERS) and not os.path.exists(
        expanded
    ):
        raise OpenkdError(f"{flag} {spec}: no such file or directory; check the path")


def load_source(
    spec: str,
    *,
    split: str = "train",
    subset: str | None = None,
    flag: str = "--dataset",
    empty_hint: str = "point it at a dataset with prompts",
    split_flag: str = "--split",
    subset_flag: str = "--subset",
) -> Dataset:
    """The dataset at `spec` as one split; OpenkdError naming `flag` and the problem if it can't
    be read. `datasets`' own error logging and progress bars are off: loading is a step of a
    larger command with its own output, and the message says what went wrong. A split other
    than train, or a subset, that a local dataset cannot honour is refused (`split_flag` and
    `subset_flag` say how the user gave them), never silently ignored."""
    import logging

    from datasets.utils import logging as ds_logging  # configures its logger; quiet it after

    log = logging.getLogger("datasets")
    level, bars = log.level, ds_logging.is_progress_bar_enabled()
    log.setLevel(logging.CRITICAL)
    ds_logging.disable_progress_bar()
    try:
        where = _Where(spec, flag, split_flag, subset_flag)
        dataset = _load(spec, split=split, subset=subset, where=where, empty_hint=empty_hint)
    finally:
        log.setLevel(level)
        if bars:
            ds_logging.enable_progress_bar()
    if len(dataset) == 0:
        raise OpenkdError(f"{flag} {spec} has no rows; {empty_hint}")
    return dataset


@dataclass(frozen=True)
class _Where:
    """How the user named a source and its split and subset, for the messages."""

    spec: str
    flag: str
    split_flag: str
    subset_flag: str

    def one_split(self, split: str) -> None:
        """A local dataset without splits is read as its one split, `train`: refuse another."""
        if split != DEFAULT_SPLIT:
            raise ConfigError(
                f"{self.flag} {self.spec} is a local dataset with one split, so "
                f"{self.split_flag} '{split}' cannot apply; drop it"
            )

    def no_subset(self, subset: str | None) -> None:
        if subset is not None:
            raise ConfigError(
                f"{self.flag} {self.spec} is local, and {self.subset_flag} '{subset}' names a "
                "configuration of a Hub dataset; drop it"
            )


def _load(spec: str, *, split: str, subset: str | None, where: _Where, empty_hint: str) -> Dataset:
    flag = where.flag
    require_source(spec, flag)
    expanded = os.path.expanduser(spec)
    files = local_files(spec)
    if files is None:
        return _load_hub(spec, split=split, subset=subset, flag=flag)
    where.no_subset(subset)
    if os.path.isdir(expanded):
        return _load_directory(Path(expanded), spec, split, where, empty_hint)
    if not files:
        raise OpenkdError(f"{flag} {spec}: no files match this pattern; check the glob")
    where.one_split(split)
    return _load_files(files, spec, flag, empty_hint)


def _load_files(files: list[Path], spec: str, flag: str, empty_hint: str) -> Dataset:
    from datasets import load_dataset

    suffixes = {f.suffix.lower() for f in files}
    unknown = suffixes - set(BUILDERS)
    if unknown:
        raise OpenkdError(
            f"{flag} {spec}: unsupported file type {', '.join(sorted(unknown))}; "
            f"use {', '.join(BUILDERS)} files"
        )
    builders = {BUILDERS[s] for s in suffixes}
    if len(builders) > 1:
        raise OpenkdError(
            f"{flag} {spec} mixes file types ({', '.join(sorted(suffixes))}); "
            "point it at files of one type"
        )
    builder = builders.pop()
    nonempty = (
        sum(count_json_lines(f) for f in files)
        if builder == "json"
        else sum(f.stat().st_size for f in files)
    )
    if nonempty == 0:
        raise OpenkdError(f"{flag} {spec} has no rows; {empty_hint}")
    try:
        return load_dataset(builder, data_files=[str(f) for f in files], split="train")
    except Exception as exc:
        if builder == "json":
            for f in files:
                if f.suffix.lower() == ".jsonl":
                    for _ in iter_jsonl(f):  # raises naming the first bad line
                        pass
        raise OpenkdError(f"{flag} {spec}: could not read it ({brief(exc)})") from exc


def count_json_lines(path: Path) -> int:
    """Non-blank lines of a JSON(L) file; OpenkdError naming the first line that is not UTF-8."""
    count = 0
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise OpenkdError(
                    f"{path}:{lineno}: not valid UTF-8; re-encode the file as UTF-8"
                ) from err
            count += bool(raw.strip())
    return count


def _load_directory(path: Path, spec: str, split: str, where: _Where, empty_hint: str) -> Dataset:
    """A `save_to_disk` directory, or the data files in one (never an output's side files:
    `*.eval.jsonl`, `*.truncated.jsonl`, `*.failed.jsonl` beside a labelled file)."""
    from datasets import DatasetDict, load_dataset, load_from_disk

    flag = where.flag
    if any((path / marker).exists() for marker in SAVE_TO_DISK_MARKERS):
        try:
            loaded = load_from_disk(str(path))
        except Exception as exc:
            raise OpenkdError(f"{flag} {spec}: could not load it ({brief(exc)})") from exc
        if isinstance(loaded, DatasetDict):
            if split not in loaded:
                raise OpenkdError(
                    f"{flag} {spec} has no split '{split}'; pass --split with one of "
                    f"{', '.join(loaded)}, or the split's own directory"
                )
            return loaded[split]
        where.one_split(split)
        return loaded
    files = [
        p
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.suffix.lower() in BUILDERS and not is_side_file(p)
    ]
    if not files:
        raise OpenkdError(
            f"{flag} {spec}: directory has no save_to_disk dataset and no "
            f"{'/'.join(BUILDERS)} files"
        )
    if len({p.suffix.lower() for p in files}) == 1:
        where.one_split(split)
        return _load_files(files, spec, flag, empty_hint)
    try:
        return load_dataset(str(path), split=split)
    except Exception as exc:
        raise OpenkdError(f"{flag} {spec}: could not load it ({brief(exc)})") from exc


def _load_hub(spec: str, *, split: str, subset: str | None, flag: str) -> Dataset:
    from datasets import load_dataset

    try:
        return load_dataset(spec, subset, split=split)
    except Exception as exc:
        where = (f" subset '{subset}'" if subset else "") + f" split '{split}'"
        raise OpenkdError(
            f"{flag} {spec}: not a local path, and loading it as a Hub dataset failed{where} "
            f"({brief(exc)}); check the path or id, --subset, --split, your network and "
            "`hf auth login` for private datasets"
        ) from exc


def selection(
    num_rows: int, *, max_samples: int | None, shuffle_seed: int | None
) -> np.ndarray | range:
    """Row positions to label, in order: shuffled with `shuffle_seed`, then cut to `max_samples`."""
    import numpy as np

    if shuffle_seed is None:
        return range(min(num_rows, max_samples or num_rows))
    order = np.random.default_rng(shuffle_seed).permutation(num_rows)
    return order[:max_samples] if max_samples else order


def iter_rows(
    dataset: Dataset,
    positions: np.ndarray | range,
    columns: list[str],
    batch_size: int,
) -> Iterator[list[tuple[int, dict[str, Any]]]]:
    """Batches of (source index, {column: value}) for `positions`, reading only `columns`.

    Rows come out of Arrow a column at a time (`to_pylist`), which is ~10x faster than
    `datasets`' per-row dicts; a 1M-row pass costs a fraction of a second.
    """
    import numpy as np

    if len(positions) == 0:
        return
    view = dataset.select_columns(columns)
    if isinstance(positions, range) and positions.step == 1:
        view = view.select(positions)
        index_of: Any = positions
    else:
        index_of = np.asarray(positions, dtype=np.int64)
        view = view.select(index_of, keep_in_memory=True)
    offset = 0
    for table in view.with_format("arrow").iter(batch_size=batch_size):
        size = table.num_rows
        values = [table.column(c).to_pylist() for c in columns]
        indices = index_of[offset : offset + size]
        indices = list(indices) if isinstance(indices, range) else indices.tolist()
        offset += size
        yield [
            (index, dict(zip(columns, row, strict=True)))
            for index, row in zip(indices, zip(*values, strict=True), strict=True)
        ]


def check_gold_answers(
    dataset: Dataset, positions: np.ndarray | range, column: str, spec: str
) -> None:
    """Every selected row has a gold answer in `column`; else one line naming the first rows."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    if column not in dataset.column_names:
        raise OpenkdError(
            f"--answer-column '{column}' is not in --dataset {spec} (columns are: "
            f"{', '.join(dataset.column_names[:30])}); pass --answer-column NAME with the gold "
            "answers --verify checks against"
        )
    values = dataset.select_columns([column]).with_format("arrow")[:]
    answers = values.column(column)
    if isinstance(positions, range) and positions.step == 1:
        answers = answers.slice(positions.start, len(positions))
        rows = np.arange(positions.start, positions.stop)
    else:
        rows = np.asarray(positions, dtype=np.int64)
        answers = answers.take(pa.array(rows))
    text = pc.cast(answers, pa.string())
    missing = pc.or_kleene(pc.is_null(text), pc.equal(pc.utf8_trim_whitespace(text), ""))
    bad = rows[np.asarray(pc.fill_null(missing, True).to_numpy(zero_copy_only=False), dtype=bool)]
    if len(bad):
        shown = ", ".join(str(int(r)) for r in bad[:5]) + (", ..." if len(bad) > 5 else "")
        raise OpenkdError(
            f"{len(bad):,} selected rows of --dataset {spec} have no gold answer in "
            f"'{column}' (rows {shown}); --verify needs one per prompt: fill them in or filter "
            "those rows out"
        )
