"""Local paths as users give them: a typo'd model directory or an unwritable output directory is
named before anything expensive starts."""

from __future__ import annotations

import os
from pathlib import Path

from openkd.errors import OpenkdError


def looks_like_path(spec: str) -> bool:
    """True for strings a user means as a local path, never as a Hub id."""
    return spec.startswith(("/", "./", "../", "~")) or os.path.exists(os.path.expanduser(spec))


def require_local_model(name: str, flag: str, hint: str = "") -> None:
    """A path-like model that does not exist is a typo, not a Hub id: say so now."""
    if looks_like_path(name) and not Path(name).expanduser().exists():
        raise OpenkdError(
            f"{flag} {name} does not exist{hint}; pass an existing model directory or a Hub id "
            "such as Qwen/Qwen2.5-0.5B-Instruct"
        )


def check_writable(target: Path, flag: str) -> None:
    """Fail now if new files cannot be created where `target` (a file or directory) goes.

    The nearest existing directory is probed with a file that is removed at once, and nothing
    is created on the way: a run that fails its later checks leaves nothing behind.
    """
    parent = Path(target).expanduser().absolute()
    if parent.is_file():  # an existing output file: its directory takes the new files
        parent = parent.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    try:
        if not parent.is_dir():
            raise NotADirectoryError(20, "Not a directory")
        probe = parent / f".openkd-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise OpenkdError(
            f"{flag} {target} is not writable ({err.strerror or err}); pass another {flag} in a "
            "directory you can write to"
        ) from err
