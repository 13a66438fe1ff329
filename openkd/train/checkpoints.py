"""Pick the checkpoint to resume from, and never one that a crash left half-written.

`transformers.trainer_utils.get_last_checkpoint` returns the highest-numbered `checkpoint-N`
even when the process died while writing it (truncated weights, no trainer_state.json, an
empty directory, a truncated optimizer.pt), and the resumed run then crashes. Here every
candidate is checked cheaply before it is used (headers, sizes, zip directories; no tensor
data is read) and torn ones are skipped, newest first, each with a warning saying why.

The Trainer writes, in this order: weights, optimizer and scheduler (or DeepSpeed's
`global_stepN/` shards and `latest`), RNG states, and `trainer_state.json` last; so a
checkpoint whose files are all present and whole was finished.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from openkd import console
from openkd.errors import OpenkdError
from openkd.train.integrity import (
    _read_state,
    checkpoint_problems,
    deepspeed_world_size,
)

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"


@dataclass(frozen=True)
class Checkpoint:
    """A `checkpoint-N` directory of a Trainer output dir."""

    path: Path
    step: int


def list_checkpoints(output_dir: Path) -> list[Checkpoint]:
    """The `checkpoint-N` directories in `output_dir`, highest step first."""
    if not output_dir.is_dir():
        return []
    found = []
    for child in output_dir.iterdir():
        match = CHECKPOINT_RE.match(child.name)
        if match and child.is_dir():
            found.append(Checkpoint(child, int(match.group(1))))
    return sorted(found, key=lambda c: c.step, reverse=True)


def find_resume_checkpoint(
    output_dir: Path,
    resume: str,
    *,
    max_steps: int | None = None,
    epochs: float | None = None,
    world_size: int | None = None,
    deepspeed: bool | None = None,
) -> Path | None:
    """The checkpoint to pass to `trainer.train(resume_from_checkpoint=...)`, or None to start fresh.

    `resume` is "auto" (newest valid checkpoint in `output_dir`), "no", or a checkpoint path
    (must be valid). `max_steps` and `epochs` are this run's length, for the "resuming ... of N"
    message (a rerun may train longer than the checkpoint's run). `world_size` and `deepspeed`
    describe the current launch; by default they are read from the environment a launcher sets
    (WORLD_SIZE, ACCELERATE_USE_DEEPSPEED).
    """
    output_dir = Path(output_dir)
    world_size = _env_world_size() if world_size is None else world_size
    deepspeed = _env_deepspeed() if deepspeed is None else deepspeed
    length = _RunLength(max_steps, epochs)
    if resume == "no":
        found = list_checkpoints(output_dir)
        if found:
            console.warn(
                f"--resume no: ignoring {len(found)} checkpoint(s) in {output_dir} "
                f"(newest: {found[0].path.name}); training starts from step 0"
            )
        return None
    if resume == "auto":
        return _newest_valid(output_dir, length, world_size=world_size, deepspeed=deepspeed)
    return _explicit(Path(resume).expanduser(), length, world_size=world_size, deepspeed=deepspeed)


def _newest_valid(
    output_dir: Path, length: _RunLength, *, world_size: int, deepspeed: bool
) -> Path | None:
    found = list_checkpoints(output_dir)
    if not found:
        if output_dir.is_dir():
            console.info(f"no checkpoint in {output_dir}: training starts from step 0")
        return None
    for ckpt in found:
        problems = checkpoint_problems(ckpt.path, expected_step=ckpt.step)
        if problems:
            moved = _move_aside(ckpt.path)
            where = f"; kept as {moved.name} for inspection" if moved else ""
            console.warn(
                f"skipping {ckpt.path}: {'; '.join(problems)} (left by an interrupted save?){where}"
            )
            continue
        _check_launch_matches(ckpt.path, world_size=world_size, deepspeed=deepspeed)
        _announce(ckpt.path, length)
        return ckpt.path
    console.warn(
        f"[bold]--resume auto found {len(found)} checkpoint(s) in {output_dir} but none can be "
        "resumed (reasons above): training starts from step 0.[/] Delete the broken ones once "
        "inspected; --resume no starts from step 0 without looking."
    )
    return None


def _move_aside(path: Path) -> Path | None:
    """Rename a torn checkpoint out of the `checkpoint-N` namespace (main process only).

    Left in place, the Trainer's --save-total-limit rotation counts it as the newest
    checkpoint and deletes good new ones first, and a later save of step N writes into it.
    """
    if not console.is_main_process():
        return None
    for n in range(1, 1000):
        target = path.with_name(f"{path.name}.torn{'' if n == 1 else f'-{n}'}")
        if not target.exists():
            try:
                path.rename(target)
            except OSError:
                return None
            return target
    return None


def check_resume_exists(resume: str) -> None:
    """Cheap early check (before any relaunch or loading) that an explicit --resume exists."""
    if resume in ("auto", "no"):
        return
    path = Path(resume).expanduser()
    if not path.exists():
        raise OpenkdError(
            f"--resume {path}: no such checkpoint directory; pass an existing checkpoint-N "
            "directory, 'auto' (newest valid one in --output-dir) or 'no'"
        )


def _explicit(path: Path, length: _RunLength, *, world_size: int, deepspeed: bool) -> Path:
    check_resume_exists(str(path))
    if path.is_dir() and not CHECKPOINT_RE.match(path.name) and list_checkpoints(path):
        newest = list_checkpoints(path)[0].path.name
        raise OpenkdError(
            f"--resume {path} is a training output directory, not a checkpoint; pass one of "
            f"its checkpoint-N directories (e.g. {path / newest}) or --resume auto"
        )
    match = CHECKPOINT_RE.match(path.name)
    problems = checkpoint_problems(path, expected_step=int(match.group(1)) if match else None)
    if problems:
        raise OpenkdError(
            f"--resume {path} is not a usable checkpoint: {'; '.join(problems)}; pass another "
            "checkpoint-N directory, or --resume auto to use the newest valid one"
        )
    _check_launch_matches(path, world_size=world_size, deepspeed=deepspeed)
    _announce(path, length)
    return path


@dataclass(frozen=True)
class _RunLength:
    """This run's --max-steps, or its --epochs when it has none (both None: not known)."""

    max_steps: int | None
    epochs: float | None


def _announce(path: Path, length: _RunLength) -> None:
    state = _read_state(path)
    step = state.get("global_step", "?")
    console.info(f"[bold green]resuming[/] from {path} at step {step}{_of(state, length)}")


def _of(state: dict, length: _RunLength) -> str:
    """The ' of N' of this run's total steps, or '' where it is not known before training.

    The checkpoint's own max_steps is that of the run which wrote it: a rerun with a higher
    --max-steps trains on past it. In epoch mode the Trainer computes the total later; the
    checkpoint's is right only for the same --epochs (same data and batch: the run identity).
    """
    if length.max_steps is not None:
        return f" of {length.max_steps}"
    total = state.get("max_steps")
    if not isinstance(total, int) or total <= 0:
        return ""
    if length.epochs is not None and state.get("num_train_epochs") != length.epochs:
        return ""
    return f" of {total}"


def _check_launch_matches(path: Path, *, world_size: int, deepspeed: bool) -> None:
    """A DeepSpeed checkpoint resumes only under DeepSpeed with the same number of processes.

    Anything else either crashes inside DeepSpeed or, worse, silently restores the weights
    but not the optimizer; say so before any work starts.
    """
    ds_world = deepspeed_world_size(path)
    if ds_world is None:
        return
    if not deepspeed:
        raise OpenkdError(
            f"{path} was written by DeepSpeed across {ds_world} process(es) but this run does "
            f"not use DeepSpeed; rerun with the same --deepspeed/--accelerate-config and "
            f"--num-processes {ds_world}, or pass --resume no to start over"
        )
    if world_size != ds_world:
        raise OpenkdError(
            f"{path} was written by {ds_world} DeepSpeed process(es) but this run has "
            f"{world_size}; rerun with --num-processes {ds_world}, or pass --resume no to "
            "start over"
        )


def _env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def _env_deepspeed() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in {"1", "true", "yes"}
