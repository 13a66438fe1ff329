"""The files one `openkd generate` output consists of, named from the output path.

For `--output data/teacher.jsonl`:

    data/teacher.jsonl            labelled rows (what `openkd train` reads)
    data/teacher.eval.jsonl       held-out rows (--eval-fraction), for `openkd eval`
    data/teacher.truncated.jsonl  answers cut at --max-new-tokens, or empty (kept, not trained on)
    data/teacher.failed.jsonl     prompts the teacher failed on, with the reason (retried on rerun)
    data/teacher.rejected.jsonl   answers that did not verify against the gold answer (--verify)
    data/teacher.meta.json        provenance: teacher, sampling, versions, counts, config
    data/teacher.README.md        dataset card (uploaded as README.md on --push-to-hub)
    data/teacher.index            resume index: how far the ids file covers each row file
    data/teacher.ids              the ids of every row, 16 bytes each (derived; safe to delete)
    data/teacher.resplit          present only while rows are re-sorted after a changed
                                  --eval-fraction or --keep-truncated (openkd.generate.resplit)
    data/teacher.server.log       the vLLM server's log (--serve)
    data/teacher.logprobs/        the teacher's top-k log-probabilities (--logprobs K), Arrow parts:
                                  openkd.data.logprobs

The card is `<stem>.README.md`, never `README.md`: the output directory is often a project
directory whose own README must not be clobbered, and shards of one run share a directory.
With `--shard i/n` the stem gets `.shard-i-of-n`, so array jobs never write the same file.
Generate writes this layout; train, eval and merge read it through this module only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from openkd.errors import OpenkdError

# Row kinds and their files' suffixes. A row in a ROW_KINDS file is done and never relabelled.
KIND_SUFFIX = {
    "train": ".jsonl",
    "eval": ".eval.jsonl",
    "truncated": ".truncated.jsonl",
    "failed": ".failed.jsonl",
    "rejected": ".rejected.jsonl",
}
RowKind = Literal["train", "eval", "truncated", "rejected"]
ROW_KINDS: tuple[RowKind, ...] = ("train", "eval", "truncated", "rejected")
SIDE_SUFFIXES = tuple(suffix for kind, suffix in KIND_SUFFIX.items() if kind != "train")
META_IN_REPO = "openkd_meta.json"  # the metadata's name in a Hub dataset repo


@dataclass(frozen=True)
class OutputFiles:
    output: Path

    @property
    def stem(self) -> Path:
        return self.output.with_suffix("")

    def _sibling(self, suffix: str) -> Path:
        return self.stem.with_name(self.stem.name + suffix)

    def kind_path(self, kind: str) -> Path:
        """The file of one row kind: train, eval, truncated or failed."""
        return self._sibling(KIND_SUFFIX[kind])

    @property
    def eval(self) -> Path:
        return self.kind_path("eval")

    @property
    def truncated(self) -> Path:
        return self.kind_path("truncated")

    @property
    def failed(self) -> Path:
        return self.kind_path("failed")

    @property
    def meta(self) -> Path:
        return self._sibling(".meta.json")

    @property
    def card(self) -> Path:
        return self._sibling(".README.md")

    @property
    def lock(self) -> Path:
        return self._sibling(".lock")

    @property
    def index(self) -> Path:
        return self._sibling(".index")

    @property
    def ids(self) -> Path:
        return self._sibling(".ids")

    @property
    def resplit(self) -> Path:
        return self._sibling(".resplit")

    @property
    def server_log(self) -> Path:
        return self._sibling(".server.log")

    @property
    def logprobs(self) -> Path:
        return self._sibling(".logprobs")

    @property
    def row_files(self) -> tuple[Path, ...]:
        """Files whose rows count as done on resume."""
        return tuple(self.kind_path(kind) for kind in ROW_KINDS)

    def all(self) -> tuple[Path, ...]:
        """Every file `--overwrite` removes (the server log stays: it is a log)."""
        rows = tuple(self.kind_path(kind) for kind in KIND_SUFFIX)
        return (*rows, self.meta, self.card, self.index, self.ids, self.resplit)

    @classmethod
    def of_file(cls, path: Path) -> OutputFiles:
        """The output a file belongs to: `t.eval.jsonl` and `t.jsonl` both belong to `t.jsonl`."""
        name = path.name
        for suffix in SIDE_SUFFIXES:
            if name.endswith(suffix):
                return cls(path.with_name(name[: -len(suffix)] + ".jsonl"))
        return cls(path)


def is_side_file(path: Path) -> bool:
    """True for the side files of an output (eval/truncated/failed), not a labelled dataset."""
    return path.name.endswith(SIDE_SUFFIXES)


def resolve_output(output: Path, shard: tuple[int, int] | None) -> OutputFiles:
    """The output files for `--output` (and `--shard`); OpenkdError if the name is unusable."""
    output = Path(os.path.expanduser(output))
    if output.is_dir():
        raise OpenkdError(
            f"--output {output} is a directory; pass a file inside it, e.g. {output / 'teacher.jsonl'}"
        )
    if output.suffix != ".jsonl":
        raise OpenkdError(
            f"--output {output} must end in .jsonl, e.g. {output.with_suffix('.jsonl')}"
        )
    if is_side_file(output):
        raise OpenkdError(
            f"--output {output} ends like an openkd side file ({', '.join(SIDE_SUFFIXES)}); "
            "choose another name"
        )
    if shard is not None:
        i, n = shard
        output = output.with_name(f"{output.stem}.shard-{i}-of-{n}.jsonl")
    return OutputFiles(output)
