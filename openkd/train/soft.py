"""Soft-label training data: the teacher's log-probabilities found, checked, and put in batches.

The sidecar (`openkd.data.logprobs`) is looked for beside `--dataset` (`<stem>.logprobs/`, for
a folder of shards each shard's) and beside `--eval-dataset`, or taken from `--logprobs DIR`.
Every row trained on must have its log-probabilities there.

An example is the student's rendering of the prompt (its chat template with the generation
prompt, as TRL tokenises the prompt for hard labels and as the student sees it at inference)
followed by the teacher's own completion token ids from the sidecar, never re-tokenised: the
teacher's top-K at completion position j is its distribution for exactly that token j. When
those ids do not end with the student's end-of-turn token (a teacher stopped by a stop string,
or cut at its token limit), openkd appends it; that position has no teacher data and is
trained on the hard label alone. Nothing follows the end-of-turn token.

Before any weights are loaded, openkd compares the teacher's vocabulary (its tokenizer is named
in the dataset's `<stem>.meta.json`) with the student's: when every teacher token has the same
id in the student (a padded embedding matrix does not matter), the soft labels are used as
stored. When they differ, `--cross-tokenizer` (`openkd.distill.crosstok`) re-expresses the
teacher's top-K on the student's tokenization of the same answer text: the example's answer is
then the student's tokens, and its per-position targets are computed once, in dataset
preparation (reused across epochs; a resumed run computes it again).
When the teacher's tokenizer cannot be loaded (an offline Hub id, a mock teacher), that check
is skipped with a warning and only the ids are checked against the student's vocabulary size:
on the first rows before training, and in every batch while training.

The top-K arrays are not copied into the prepared dataset (it would be as large as the
sidecar): the dataset keeps each row's id and where its completion starts, and the collator
reads the rows of each batch from the memory-mapped sidecar and pads them with the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from openkd import console
from openkd.chat import prompt_ids
from openkd.data.logprobs import SidecarReader, bytes_per_token, sidecar_dir
from openkd.errors import OpenkdError
from openkd.teacher.tokenizer import check_tokenizers
from openkd.train.preflight import IGNORE

if TYPE_CHECKING:
    from datasets import Dataset

    from openkd.distill.crosstok.aligner import Aligner
    from openkd.distill.crosstok.preflight import Coverage
    from openkd.train.config import TrainConfig
    from openkd.train.data import TrainData

# Rows whose stored ids are checked against the student's vocabulary before training.
PREFLIGHT_ROWS = 64
TEACHER_KEYS = ("teacher_ids", "teacher_logprobs", "teacher_mask")
FIX = "use --loss hard"


@dataclass
class SoftLabels:
    """The sidecar a run trains on, and what the pre-flight found."""

    reader: SidecarReader
    directories: list[Path]
    vocab_size: int  # the student's logits size: every teacher id must be below it
    lines: list[str] = field(default_factory=list)  # pre-flight results to print
    warnings: list[str] = field(default_factory=list)
    aligner: Aligner | None = None  # the tokenizers differ: targets on the student's tokens
    coverage: Coverage | None = None

    @property
    def k(self) -> int:
        return int(self.reader.k or 0)

    def describe(self) -> str:
        dirs = ", ".join(str(d) for d in self.directories)
        return f"top-{self.k} {self.reader.dtype} in {dirs}"

    def describe_cross(self) -> str | None:
        """The cross-tokenizer method and its coverage, for the summary and the card."""
        if self.coverage is None:
            return None
        return f"{self.coverage.method}: {self.coverage.describe()}"


def _sidecars_beside(spec: str) -> list[Path]:
    path = Path(spec).expanduser()
    if path.is_file():
        candidates = [sidecar_dir(path)]
    elif path.is_dir():
        candidates = sorted({sidecar_dir(p) for p in path.glob("*.jsonl") if p.is_file()})
    else:
        candidates = []
    return [c for c in candidates if c.is_dir()]


def find_sidecars(cfg: TrainConfig) -> list[Path]:
    """The sidecar directories of --dataset and --eval-dataset (or --logprobs); one-line errors."""
    what = f"--loss {cfg.loss} trains on the teacher's top-k log-probabilities"
    found: list[Path] = []
    if cfg.logprobs:
        from openkd.export.imports import detect

        given = Path(cfg.logprobs).expanduser()
        if given.is_file() and detect(given) is None:
            raise OpenkdError(
                f"--logprobs {cfg.logprobs} is a file; pass the <stem>.logprobs/ directory that "
                "`openkd generate --logprobs K` wrote (or an axolotl-kd/DistillKit set)"
            )
        if not given.exists():
            raise OpenkdError(
                f"--logprobs {cfg.logprobs}: no such directory; pass the <stem>.logprobs/ "
                f"directory `openkd generate --logprobs K` wrote, or {FIX}"
            )
        found.append(given)
    else:
        found += _sidecars_beside(cfg.dataset)
        if not found:
            path = Path(cfg.dataset).expanduser()
            where = (
                f"there is no {sidecar_dir(path)}/ beside --dataset {cfg.dataset}"
                if path.exists()
                else f"--dataset {cfg.dataset} is not a local file, so it has no sidecar"
            )
            raise OpenkdError(
                f"{what}, but {where}; label with `openkd generate --logprobs K`, pass "
                f"--logprobs DIR, or {FIX}"
            )
    if cfg.eval_dataset:
        found += [d for d in _sidecars_beside(cfg.eval_dataset) if d not in found]
    return found


def check_coverage(reader: SidecarReader, dataset: Dataset | None, what: str) -> None:
    """Every row of `dataset` must have stored log-probabilities."""
    if dataset is None:
        return
    if "id" not in dataset.column_names:
        raise OpenkdError(
            f"{what} has no 'id' column, so its rows cannot be matched with the teacher's "
            f"log-probabilities; train on what `openkd generate` wrote, or {FIX}"
        )
    missing: list[str] = []
    for batch in dataset.select_columns(["id"]).iter(batch_size=100_000):
        missing += reader.missing(batch["id"])
    if missing:
        raise OpenkdError(
            f"{len(missing):,} of {len(dataset):,} rows of {what} have no teacher log-probabilities "
            f"in {', '.join(str(d) for d in reader.directories)} (first: {missing[0]}); label "
            f"them with `openkd generate --logprobs K`, or {FIX}"
        )


def check_ids_fit(reader: SidecarReader, ids: Sequence[str], vocab_size: int) -> int:
    """Raise unless every stored id of these rows is below the student's vocabulary size."""
    largest = -1
    for row_id in ids:
        row = reader.get(row_id)
        if row is None or not len(row.token_ids):
            continue
        largest = max(largest, int(row.token_ids.max()), int(row.top_ids.max()))
    if largest >= vocab_size:
        raise OpenkdError(id_error(largest, vocab_size))
    return largest


def id_error(largest: int, vocab_size: int) -> str:
    return (
        f"the teacher's log-probabilities name token id {largest}, but the student's vocabulary "
        f"has {vocab_size:,} tokens: teacher and student do not share a tokenizer; {FIX}"
    )


def student_vocab_size(student: str, *, trust_remote_code: bool) -> int:
    """The size of the student's logits (its config's vocab_size; may exceed the tokenizer's)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(student, trust_remote_code=trust_remote_code)
    return int(config.get_text_config().vocab_size)


def prepare_soft_labels(
    cfg: TrainConfig, data: TrainData, tokenizer: Any, student: str
) -> SoftLabels:
    """Find and open the sidecar and run the soft-label pre-flight; nothing loads weights."""
    from openkd.export.imports import import_sets

    # axolotl-kd / DistillKit / Parquet sets: read through a sidecar converted from them once
    directories, imported, import_warnings = import_sets(find_sidecars(cfg), tokenizer)
    reader = SidecarReader(directories)
    if reader.k is None:
        raise OpenkdError(
            f"{', '.join(str(d) for d in directories)} holds no log-probabilities yet; label "
            f"with `openkd generate --logprobs K`, or {FIX}"
        )
    check_coverage(reader, data.train, f"--dataset {cfg.dataset}")
    eval_what = f"--eval-dataset {cfg.eval_dataset}" if cfg.eval_dataset else "the held-out rows"
    check_coverage(reader, data.eval, eval_what)
    vocab = student_vocab_size(student, trust_remote_code=cfg.trust_remote_code)
    first = data.train.select(range(min(PREFLIGHT_ROWS, len(data.train))))
    sample = first["id"]
    teacher_info = data.teacher
    teacher = teacher_info["name"] if teacher_info else None
    same, warning, teacher_tokenizer = check_tokenizers(
        tokenizer,
        teacher,
        trust_remote_code=cfg.trust_remote_code,
        revision=teacher_info.get("revision") if teacher_info else None,
        cross=cfg.cross_tokenizer or "auto",
    )
    if teacher_tokenizer is None:  # one vocabulary: the stored ids are the student's
        check_ids_fit(reader, sample, vocab)
    soft = SoftLabels(reader=reader, directories=directories, vocab_size=vocab)
    soft.lines += imported
    soft.warnings += import_warnings
    size = reader.nbytes
    soft.lines.append(
        f"teacher log-probabilities: {soft.describe()} ({size / 2**20:,.1f} MiB, "
        f"{bytes_per_token(soft.k, reader.dtype or 'float16')} bytes per token), for all "
        f"{len(data.train) + (len(data.eval) if data.eval is not None else 0):,} rows"
    )
    if same:
        soft.lines.append(same)
    if teacher_tokenizer is not None:
        _cross_tokenizer(cfg, soft, teacher_tokenizer, tokenizer, first, str(teacher))
    else:
        soft.lines.append(
            f"the teacher's ids of the first {len(sample)} rows are below the student's "
            f"vocabulary size {vocab:,} (every batch is checked too)"
        )
    if warning:
        soft.warnings.append(
            f"{warning}; only the teacher's token ids are checked against the student's "
            f"vocabulary size. If the two tokenizers differ the soft labels are wrong: {FIX}"
        )
    if reader.torn:
        console.warn(
            f"{len(reader.torn)} sidecar part(s) end in a torn write (a killed run), ignored: "
            f"{reader.torn[0]}"
        )
    return soft


def completion_text(row: dict[str, Any]) -> str | None:
    """The dataset's answer text (the messages of `completion` joined), if the row has one."""
    completion = row.get("completion")
    if not completion:
        return None
    return "".join(m.get("content") or "" for m in completion)


def _cross_tokenizer(
    cfg: TrainConfig,
    soft: SoftLabels,
    teacher_tokenizer: Any,
    tokenizer: Any,
    first: Dataset,
    teacher: str,
) -> None:
    """Set up the alignment, measure its coverage on the first rows, refuse when too low."""
    from openkd.distill.crosstok import preflight
    from openkd.distill.crosstok.aligner import Aligner

    method = "uld" if cfg.cross_tokenizer == "uld" else "gold"
    eos = tokenizer.eos_token_id
    soft.aligner = Aligner(teacher_tokenizer, tokenizer, method, int(eos if eos is not None else 0))
    pairs = ((soft.reader[row["id"]], completion_text(row)) for row in first)
    soft.coverage = preflight.measure(soft.aligner, pairs, method)
    minimum = (
        preflight.MIN_COVERAGE
        if cfg.cross_tokenizer_min_coverage is None
        else cfg.cross_tokenizer_min_coverage
    )
    preflight.check(soft.coverage, minimum, teacher)
    soft.lines.append(
        f"cross-tokenizer ({method}, --cross-tokenizer {cfg.cross_tokenizer or 'auto'}): "
        f"{soft.aligner.shared_vocabulary():.0%} of the teacher's tokens are a student token; "
        f"{soft.coverage.describe()} (at least {minimum:.0%} needed)"
    )


def build_example(
    prompt: Sequence[int], completion: Sequence[int], eos_id: int | None, max_length: int
) -> dict[str, Any]:
    """input_ids, labels and kd_start (where the teacher's completion ids begin).

    The completion is the teacher's ids, with `eos_id` appended unless they end with it;
    everything is cut at `max_length` (the end is lost, as TRL truncates).
    """
    answer = [int(t) for t in completion]
    if eos_id is not None and (not answer or answer[-1] != eos_id):
        answer.append(int(eos_id))
    input_ids = [int(t) for t in prompt] + answer
    labels = [IGNORE] * len(prompt) + answer
    return {
        "input_ids": input_ids[:max_length],
        "labels": labels[:max_length],
        "kd_start": len(prompt),
    }


def tokenize_rows(
    batch: dict[str, list],
    tokenizer: Any,
    reader: SidecarReader,
    eos_id: int,
    max_length: int,
    aligner: Aligner | None = None,
) -> dict[str, list]:
    """`datasets.map` function (batched): rows with id/prompt -> examples on the teacher's ids.

    With `aligner` (the tokenizers differ) the answer is the student's tokens of the teacher's
    text, and `CROSS_KEYS` hold each answer position's target, flattened ([n * K] ids and
    log-probabilities, [n] kinds): computed here once per run, reused by every epoch.
    """
    out: dict[str, list] = {"input_ids": [], "labels": [], "kd_start": []}
    if aligner is not None:
        out.update({key: [] for key in CROSS_KEYS})
    answers = batch.get("completion") or [None] * len(batch["id"])
    for row_id, prompt, completion in zip(batch["id"], batch["prompt"], answers, strict=True):
        if aligner is None:
            tokens = reader.token_ids(row_id)
            if tokens is None:
                raise OpenkdError(f"row {row_id} has no teacher log-probabilities; {FIX}")
            answer = tokens.tolist()
        else:
            stored = reader.get(row_id)
            if stored is None:
                raise OpenkdError(f"row {row_id} has no teacher log-probabilities; {FIX}")
            text = completion_text({"completion": completion})
            aligned = aligner.align(stored.token_ids, stored.top_ids, stored.top_logprobs, text)
            answer = aligned.student_ids
            targets = aligned.targets
            out["xt_ids"].append(targets.ids.astype(np.int32).reshape(-1))
            out["xt_logprobs"].append(targets.logprobs.astype(np.float32).reshape(-1))
            out["xt_kind"].append(targets.kind)
        example = build_example(prompt_ids(tokenizer, prompt), answer, eos_id, max_length)
        for key in ("input_ids", "labels", "kd_start"):
            out[key].append(example[key])
    return out


CROSS_KEYS = ("xt_ids", "xt_logprobs", "xt_kind")


def has_answer(batch: dict[str, list]) -> list[bool]:
    """`datasets.filter` function (batched): examples that kept at least one answer token."""
    return [
        start < len(ids) for start, ids in zip(batch["kd_start"], batch["input_ids"], strict=True)
    ]


def answer_text(
    tokenizer: Any,
    reader: SidecarReader,
    row: dict[str, Any],
    eos_id: int,
    aligner: Aligner | None = None,
) -> str:
    """The teacher's answer as its ids decode (what soft-label training trains on)."""
    if aligner is not None:
        stored = reader[row["id"]]
        aligned = aligner.align(
            stored.token_ids, stored.top_ids, stored.top_logprobs, completion_text(row)
        )
        return tokenizer.decode(aligned.student_ids, skip_special_tokens=False)
    tokens = [int(t) for t in reader[row["id"]].token_ids]
    if tokens and tokens[-1] == eos_id:
        tokens = tokens[:-1]
    return tokenizer.decode(tokens, skip_special_tokens=False)


class TeacherCollator:
    """TRL's collator plus the teacher's top-K arrays, aligned with `labels` and padded.

    Adds `teacher_ids` [B, L, K] (int64), `teacher_logprobs` [B, L, K] (float32) and
    `teacher_mask` [B, L] (True where position j holds the teacher's distribution for token j).
    """

    def __init__(self, base: Any, reader: SidecarReader, vocab_size: int) -> None:
        self.base = base
        self.reader = reader
        self.vocab_size = vocab_size

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        batch = self.base([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples])
        rows, length = batch["input_ids"].shape
        k = int(self.reader.k or 0)
        ids = np.zeros((rows, length, k), dtype=np.int64)
        logprobs = np.zeros((rows, length, k), dtype=np.float32)
        mask = np.zeros((rows, length), dtype=bool)
        if "xt_kind" in examples[0]:
            return self._cross(batch, examples, k)
        for b, example in enumerate(examples):
            row = self.reader.get(example["id"])
            if row is None:
                raise OpenkdError(f"row {example['id']} has no teacher log-probabilities; {FIX}")
            start = int(example["kd_start"])
            n = min(len(row.token_ids), len(example["input_ids"]) - start)
            if n <= 0:
                continue
            if not np.array_equal(row.token_ids[:n], example["input_ids"][start : start + n]):
                raise OpenkdError(
                    f"row {example['id']}: the prepared example's answer differs from the "
                    "teacher's token ids in the sidecar (changed since the dataset cache was "
                    "built?); clear the datasets cache (~/.cache/huggingface/datasets) and rerun"
                )
            ids[b, start : start + n] = row.top_ids[:n]
            logprobs[b, start : start + n] = row.top_logprobs[:n]
            mask[b, start : start + n] = True
        if mask.any():
            largest = int(ids[mask].max())
            if largest >= self.vocab_size:
                raise OpenkdError(id_error(largest, self.vocab_size))
        batch["teacher_ids"] = torch.from_numpy(ids)
        batch["teacher_logprobs"] = torch.from_numpy(logprobs)
        batch["teacher_mask"] = torch.from_numpy(mask)
        return batch

    def _cross(self, batch: dict[str, Any], examples: list[dict[str, Any]], k: int) -> dict:
        """Targets computed across tokenizers (`tokenize_rows`), placed and padded as above.

        Adds `teacher_valid` [B, L, K] (slots holding a target; a padding slot repeats the
        row's first id) and `teacher_uld` [B, L] (positions matched by ULD).
        """
        import torch

        from openkd.distill.crosstok.targets import EXACT, MERGED, ULD

        rows, length = batch["input_ids"].shape
        ids = np.zeros((rows, length, k), dtype=np.int64)
        logprobs = np.full((rows, length, k), -np.inf, dtype=np.float32)
        kinds = np.zeros((rows, length), dtype=np.int8)
        for b, example in enumerate(examples):
            start = int(example["kd_start"])
            kind = np.asarray(example["xt_kind"], dtype=np.int8)
            n = min(len(kind), len(example["input_ids"]) - start)
            if n <= 0:
                continue
            ids[b, start : start + n] = np.asarray(example["xt_ids"]).reshape(-1, k)[:n]
            logprobs[b, start : start + n] = np.asarray(example["xt_logprobs"]).reshape(-1, k)[:n]
            kinds[b, start : start + n] = kind[:n]
        valid = np.isfinite(logprobs) & np.isin(kinds, (EXACT, MERGED))[..., None]
        ids = np.where(valid, ids, ids[..., :1])
        uld = kinds == ULD
        mask = valid.any(-1) | uld
        if valid.any() and int(ids[valid].max()) >= self.vocab_size:
            raise OpenkdError(id_error(int(ids[valid].max()), self.vocab_size))
        batch["teacher_ids"] = torch.from_numpy(ids)
        batch["teacher_logprobs"] = torch.from_numpy(logprobs)
        batch["teacher_mask"] = torch.from_numpy(mask)
        batch["teacher_valid"] = torch.from_numpy(valid)
        batch["teacher_uld"] = torch.from_numpy(uld)
        return batch
