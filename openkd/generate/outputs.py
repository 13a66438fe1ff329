"""Operations on the files of a `openkd generate` output (named in `openkd.data.layout`):
checked writable before any work, removed by --overwrite, locked against a second writer."""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from openkd import console
from openkd.data.layout import OutputFiles
from openkd.errors import OpenkdError
from openkd.paths import check_writable


def check_output(files: OutputFiles) -> None:
    """Fail now, before a teacher starts, if the output cannot be written."""
    check_writable(files.output, "--output")
    for path in files.all():
        if path.exists() and not os.access(path, os.W_OK):
            raise OpenkdError(
                f"{path} is not writable; fix its permissions or pass another --output"
            )


def check_ours(files: OutputFiles) -> None:
    """--overwrite deletes an output only when openkd wrote it (its metadata says so)."""
    if files.meta.exists():
        return
    theirs = [p for p in (*files.row_files, files.failed) if p.is_file() and p.stat().st_size]
    if theirs:
        raise OpenkdError(
            f"--overwrite: {theirs[0]} has rows but no {files.meta.name}, so openkd did not "
            "write it and will not delete it; pass another --output"
        )


def check_not_input(files: OutputFiles, dataset: str) -> None:
    """Refuse an output whose files are, or would become, part of the --dataset it reads."""
    expanded = os.path.expanduser(dataset)
    ours = [Path(os.path.abspath(p)) for p in (*files.all(), files.server_log)]
    fix = "pass an --output outside the dataset"
    if any(ch in expanded for ch in "*?["):
        pattern = os.path.abspath(expanded)
        hit = next((p for p in ours if _glob_matches(pattern, p)), None)
        if hit is not None:
            raise OpenkdError(
                f"--output {files.output}: {hit.name} matches --dataset {dataset}, so the "
                f"teacher's rows would be read back as prompts; {fix}"
            )
        return
    source = Path(os.path.realpath(expanded))
    if source.is_dir():
        out_dir = Path(os.path.realpath(files.output.parent))
        if out_dir == source or source in out_dir.parents:
            raise OpenkdError(
                f"--output {files.output} lies inside --dataset {dataset}, so the teacher's "
                f"rows would be read back as prompts; {fix}"
            )
    elif any(os.path.realpath(p) == str(source) for p in ours):
        raise OpenkdError(
            f"--output {files.output} would overwrite --dataset {dataset} (an input is never "
            f"written); {fix}"
        )


def _glob_matches(pattern: str, path: Path) -> bool:
    """Whether glob `pattern` would match `path` (component by component; `**` spans any)."""
    if "**" in pattern:
        return fnmatch.fnmatch(str(path), pattern)
    parts = Path(pattern).parts
    return len(parts) == len(path.parts) and all(
        fnmatch.fnmatch(name, part) for name, part in zip(path.parts, parts, strict=True)
    )


def remove_all(files: OutputFiles) -> list[Path]:
    """--overwrite: name, then delete, every file of this output (`check_ours` has made sure
    openkd wrote them); return what was removed."""
    doomed = [path for path in files.all() if path.exists()]
    if files.logprobs.is_dir() and files.meta.exists():
        doomed.append(files.logprobs)
    if doomed:
        names = ", ".join(path.name for path in doomed)
        console.info(f"--overwrite: removing the earlier output's files: {names}")
    for path in doomed:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    return doomed


@contextlib.contextmanager
def exclusive(files: OutputFiles) -> Iterator[None]:
    """Hold a lock on the output so two runs cannot append to the same files at once."""
    files.lock.parent.mkdir(parents=True, exist_ok=True)
    with open(files.lock, "w") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            raise OpenkdError(
                f"another `openkd generate` is writing {files.output} (lock {files.lock}); "
                "wait for it or pass another --output"
            ) from err
        except OSError:
            pass  # file systems without flock (some NFS setups): run unlocked
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                files.lock.unlink()
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
