"""The files one `openkd generate` output consists of, named from the output path.

For `--output data/teacher.jsonl`:

    data/teacher.jsonl            labelled rows (what `openkd train` reads)
    data/teacher.eval.jsonl       held-out rows (--eval-fraction), for `openkd eval`
    data/teacher.truncated.jsonl  answers cut at --max-new-tokens, or empty (kept, not trained on)
    data/teacher.failed.jsonl     prompts the teacher failed on, with the reason (retried on rerun)
    data/teacher.meta.json        provenance: teacher, sampling, versions, counts, config
    data/teacher.README.md        dataset card (uploaded as README.md on --push-to-hub)
    data/teacher.index            resume index: how far the ids file covers each row file
    data/teacher.ids              the ids of every row, 16 bytes each (derived; safe to delete)

The card is `<stem>.README.md`, never `README.md`: the output directory is often a project
directory whose own README must not be clobbered, and shards of one run share a directory.
With `--shard i/n` the stem gets `.shard-i-of-n`, so array jobs never write the same file.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from openkd.errors import OpenkdError

SIBLING_SUFFIXES = (".eval.jsonl", ".truncated.jsonl", ".failed.jsonl")
# The files holding labelled rows; a row in any of them is done and never labelled again.
ROW_KINDS = ("train", "eval", "truncated")


@dataclass(frozen=True)
class OutputFiles:
    output: Path

    @property
    def stem(self) -> Path:
        return self.output.with_suffix("")

    def _sibling(self, suffix: str) -> Path:
        return self.stem.with_name(self.stem.name + suffix)

    @property
    def eval(self) -> Path:
        return self._sibling(".eval.jsonl")

    @property
    def truncated(self) -> Path:
        return self._sibling(".truncated.jsonl")

    @property
    def failed(self) -> Path:
        return self._sibling(".failed.jsonl")

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
    def logprobs(self) -> Path:
        """The teacher's top-k log-probabilities (`--logprobs K`): see openkd.data.logprobs."""
        from openkd.data.logprobs import sidecar_dir

        return sidecar_dir(self.output)

    @property
    def row_files(self) -> tuple[Path, Path, Path]:
        """Files whose rows count as done on resume."""
        return (self.output, self.eval, self.truncated)

    def kind_path(self, kind: str) -> Path:
        """The file of one row kind: train, eval, truncated or failed."""
        return {
            "train": self.output,
            "eval": self.eval,
            "truncated": self.truncated,
            "failed": self.failed,
        }[kind]

    def all(self) -> tuple[Path, ...]:
        return (
            self.output,
            self.eval,
            self.truncated,
            self.failed,
            self.meta,
            self.card,
            self.index,
            self.ids,
        )


def is_sibling(path: Path) -> bool:
    """True for the side files of an output (eval/truncated/failed), not a labelled dataset."""
    return path.name.endswith(SIBLING_SUFFIXES)


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
    if is_sibling(output):
        raise OpenkdError(
            f"--output {output} ends like an openkd side file ({', '.join(SIBLING_SUFFIXES)}); "
            "choose another name"
        )
    if shard is not None:
        i, n = shard
        output = output.with_name(f"{output.stem}.shard-{i}-of-{n}.jsonl")
    return OutputFiles(output)


def check_writable(files: OutputFiles) -> None:
    """Fail now, before a teacher starts, if the output directory cannot take new files."""
    # Probe the nearest existing directory instead of creating any: a run that fails its
    # later checks must leave nothing behind.
    parent = files.output.parent.absolute()
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    try:
        if not parent.is_dir():
            raise NotADirectoryError(20, "Not a directory")
        probe = parent / f".openkd-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OpenkdError(
            f"--output {files.output} is not writable ({exc.strerror or exc}); "
            "pass an --output in a directory you can write to"
        ) from None
    for path in files.all():
        if path.exists() and not os.access(path, os.W_OK):
            raise OpenkdError(
                f"{path} is not writable; fix its permissions or pass another --output"
            )


def remove_all(files: OutputFiles) -> list[Path]:
    """--overwrite: delete every file of this output; return what was removed."""
    removed = []
    for path in files.all():
        if path.exists():
            path.unlink()
            removed.append(path)
    return removed


@contextlib.contextmanager
def exclusive(files: OutputFiles) -> Iterator[None]:
    """Hold a lock on the output so two runs cannot append to the same files at once."""
    files.lock.parent.mkdir(parents=True, exist_ok=True)
    with open(files.lock, "w") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OpenkdError(
                f"another `openkd generate` is writing {files.output} (lock {files.lock}); "
                "wait for it or pass another --output"
            ) from None
        except OSError:
            pass  # file systems without flock (some NFS setups): run unlocked
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                files.lock.unlink()
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
