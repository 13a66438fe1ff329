"""Local paths as users give them: a typo'd model directory or an unwritable output directory is
named before anything expensive starts."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from openkd.errors import ConfigError, OpenkdError


def looks_like_path(spec: str) -> bool:
    """True for strings a user means as a local path, never as a Hub id."""
    return spec.startswith(("/", "./", "../", "~")) or os.path.exists(os.path.expanduser(spec))


def model_path(spec: str) -> str:
    """A model as its loader must see it: `~` expanded (neither vLLM nor transformers does
    that, and an unexpanded path reads as a bad Hub id); a Hub id unchanged."""
    return os.path.expanduser(spec) if spec.startswith("~") else spec


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


def _resolved(path: str | Path) -> Path:
    return Path(os.path.expanduser(str(path))).resolve()


def refuse_input_as_output(
    output: str | Path,
    inputs: dict[str, str | Path | None],
    *,
    output_flag: str,
    written: Callable[[Path], bool] | None = None,
) -> None:
    """Refuse a run whose output would write over, or delete, one of its own inputs.

    `inputs` maps each input flag to its value (None, Hub ids and globs are skipped). An input
    is refused when it is the output, when the output lies inside it (the command would write
    into an input directory), or when it lies inside the output and `written(relative path)`
    says the command writes or removes that path there (by default: anything inside it).
    Paths are compared expanded and resolved, so `~`, `..` and symlinks do not hide a match.
    """
    out = _resolved(output)
    for flag, value in inputs.items():
        if (
            value is None
            or any(ch in str(value) for ch in "*?[")
            or not looks_like_path(str(value))
        ):
            continue
        path = _resolved(value)
        if path == out:
            problem = f"{flag} {value} is also {output_flag} {output}: it would be overwritten"
        elif out.is_relative_to(path):
            problem = (
                f"{output_flag} {output} lies inside {flag} {value}: the output would be "
                "written into an input"
            )
        elif path.is_relative_to(out) and (written is None or written(path.relative_to(out))):
            problem = (
                f"{flag} {value} lies inside {output_flag} {output}, where it would be "
                "overwritten or removed"
            )
        else:
            continue
        raise ConfigError(f"{problem}; pass another {output_flag}")
