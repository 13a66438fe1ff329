"""Operations on the files of a `openkd generate` output (named in `openkd.data.layout`):
checked writable before any work, removed by --overwrite, locked against a second writer."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

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


def remove_all(files: OutputFiles) -> list[Path]:
    """--overwrite: delete every file of this output; return what was removed."""
    removed = []
    for path in files.all():
        if path.exists():
            path.unlink()
            removed.append(path)
    if files.logprobs.is_dir():
        shutil.rmtree(files.logprobs)
        removed.append(files.logprobs)
    return removed


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
