"""`openkd train` resumes for real: after SIGKILL, past a torn checkpoint, and on request only.

Every run here is the CLI in a subprocess, as a user runs it. A reference run trains 12 steps
uninterrupted; the interrupted and repaired runs must end with exactly its weights (CPU
training is deterministic for a fixed seed, so the comparison is bitwise).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from openkd.train.integrity import checkpoint_problems
from tests.conftest import run_cli, sigkill_once
from tests.helpers import error_line
from tests.train_helpers import TINY_RUN, train_argv, write_reverse_dataset
from tests.train_resume_helpers import assert_same_weights, flat, global_step

pytestmark = pytest.mark.slow

MAX_STEPS = 12
SAVE_STEPS = 4
# 64 rows in batches of 10 is 7 steps an epoch: step 12 ends inside the second epoch, the case
# where transformers, resumed from its last checkpoint, trains a step too many.
RESUMED = re.compile(r"resuming from (\S+checkpoint-(\d+)) at step (\d+) of 12")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_reverse_dataset(tmp_path_factory.mktemp("data") / "train.jsonl")


def train_args(tiny_model: Path, dataset: Path, output_dir: Path, *extra: str) -> list[str]:
    return train_argv(
        tiny_model, dataset, output_dir, *extra,
        base=TINY_RUN, max_steps=MAX_STEPS, save_steps=SAVE_STEPS, save_total_limit=3,
    )  # fmt: skip


ENV = {"OMP_NUM_THREADS": "1"}


def _train(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    proc = run_cli(*args, env=ENV, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def reference(tiny_model: Path, dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same training, never interrupted."""
    out = tmp_path_factory.mktemp("reference") / "out"
    _train(*train_args(tiny_model, dataset, out))
    assert global_step(out) == MAX_STEPS
    return out


def test_sigkill_then_rerun_resumes_and_ends_like_an_uninterrupted_run(
    tiny_model: Path, dataset: Path, reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    args = train_args(tiny_model, dataset, out)
    # Killed as soon as the first checkpoint is complete (trainer_state.json is written last).
    sigkill_once(*args, written=out / f"checkpoint-{SAVE_STEPS}" / "trainer_state.json", env=ENV)
    assert not (out / "model.safetensors").exists(), "the run finished before the kill"

    started = time.monotonic()
    resumed = _train(*args)
    resume_wall = time.monotonic() - started

    found = RESUMED.search(flat(resumed.stderr))
    assert found, resumed.stderr[-3000:]
    ckpt, step = Path(found.group(1)), int(found.group(2))
    assert ckpt.parent == out
    assert step >= SAVE_STEPS and step % SAVE_STEPS == 0 and int(found.group(3)) == step
    assert global_step(out) == MAX_STEPS
    assert_same_weights(out, reference)
    print(f"resumed from step {step}: rerun took {resume_wall:.1f} s")


def test_torn_newest_checkpoint_is_skipped_end_to_end(
    tiny_model: Path, dataset: Path, reference: Path, tmp_path: Path
) -> None:
    """A crash while writing checkpoint-12: the rerun warns, resumes from 8, trains 9-12."""
    out = Path(shutil.copytree(reference, tmp_path / "out"))
    for name in ("model.safetensors", "trainer_state.json", "README.md"):
        (out / name).unlink()  # the final save never happened
    newest = out / f"checkpoint-{MAX_STEPS}"
    weights = newest / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)

    proc = _train(*train_args(tiny_model, dataset, out))

    err = flat(proc.stderr)
    assert f"skipping {newest}: model.safetensors is" in err
    assert "(truncated?)" in err
    assert f"resuming from {out / 'checkpoint-8'} at step 8 of 12" in err
    assert (out / f"checkpoint-{MAX_STEPS}.torn" / "model.safetensors").is_file()
    assert checkpoint_problems(newest, expected_step=MAX_STEPS) == []  # saved again, whole
    assert global_step(out) == MAX_STEPS
    assert_same_weights(out, reference)


def test_resume_path_to_a_torn_checkpoint_is_a_one_line_error(
    tiny_model: Path, dataset: Path, reference: Path, tmp_path: Path
) -> None:
    out = Path(shutil.copytree(reference, tmp_path / "out"))
    torn = out / "checkpoint-8"
    (torn / "trainer_state.json").unlink()

    proc = run_cli(*train_args(tiny_model, dataset, out, "--resume", str(torn)), env=ENV)

    assert proc.returncode == 1
    line = error_line(proc.stderr)
    assert f"--resume {torn} is not a usable checkpoint: no trainer_state.json" in line


def test_resume_no_starts_from_step_zero(
    tiny_model: Path, dataset: Path, reference: Path, tmp_path: Path
) -> None:
    out = Path(shutil.copytree(reference, tmp_path / "out"))

    proc = _train(*train_args(tiny_model, dataset, out, "--resume", "no"))

    err = flat(proc.stderr)
    assert "--resume no: ignoring 3 checkpoint(s)" in err
    assert "resuming from" not in err
    assert "12 (12 in this run)" in err  # all 12 steps trained again, from the base weights
    assert_same_weights(out, reference)


def test_rerun_of_a_finished_run_trains_no_extra_step(
    tiny_model: Path, dataset: Path, reference: Path, tmp_path: Path
) -> None:
    """Resuming the last checkpoint must not train step 13 (a transformers off-by-one)."""
    out = Path(shutil.copytree(reference, tmp_path / "out"))

    proc = _train(*train_args(tiny_model, dataset, out))

    assert f"resuming from {out / 'checkpoint-12'} at step 12 of 12" in flat(proc.stderr)
    assert not (out / "checkpoint-13").exists()
    assert global_step(out) == MAX_STEPS
    assert_same_weights(out, reference)


def test_rerun_with_more_steps_says_this_runs_total(
    tiny_model: Path, dataset: Path, reference: Path, tmp_path: Path
) -> None:
    """Raising --max-steps continues the run: the message names the new total, not 12."""
    out = Path(shutil.copytree(reference, tmp_path / "out"))
    args = train_args(tiny_model, dataset, out)
    args[args.index("--max-steps") + 1] = "14"

    proc = _train(*args)

    assert f"resuming from {out / 'checkpoint-12'} at step 12 of 14" in flat(proc.stderr)
    assert global_step(out) == 14
