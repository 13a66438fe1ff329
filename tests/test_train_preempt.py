"""`openkd train` survives preemption: SIGTERM or SIGUSR1 mid-run saves a checkpoint at the
next optimizer step and exits 75; the rerun resumes from it and ends with the weights of a run
that was never interrupted (CPU training is deterministic for a fixed seed: compared bitwise).

Every training run is the CLI in a subprocess, signalled once a training step has been logged;
the fast tests drive the callback, the launcher's report and the CLI's exit directly.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from openkd.errors import PREEMPTED
from openkd.train.checkpoints import find_resume_checkpoint
from openkd.train.integrity import checkpoint_problems
from tests.conftest import run_cli
from tests.helpers import sharper_copy
from tests.train_resume_helpers import (
    assert_same_weights,
    flat,
    global_step,
    write_reverse_dataset,
)

ENV = {"OMP_NUM_THREADS": "1"}
MAX_STEPS = 16
PREEMPTED_LINE = re.compile(
    r"preempted at step (\d+): checkpoint saved to (\S+); rerun the same command to resume"
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_reverse_dataset(tmp_path_factory.mktemp("data") / "train.jsonl")


def train_args(tiny_model: Path, dataset: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--student", str(tiny_model),
        "--dataset", str(dataset),
        "--output-dir", str(out),
        "--max-steps", str(MAX_STEPS),
        "--save-steps", "100",  # no regular checkpoint: only the preemption's
        "--batch-size", "10",
        "--learning-rate", "1e-3",
        "--logging-steps", "1",
        "--max-length", "128",
        "--seed", "7",
        *extra,
    ]  # fmt: skip


def signal_during_training(
    args: list[str], sig: int, *, pick=None, timeout: float = 600
) -> tuple[int, str]:
    """Run `openkd ARGS`, send `sig` once step 1 is logged (to `pick(parent)`'s pid, default
    the parent), and return the exit code and stderr."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "openkd", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **ENV},
        start_new_session=True,
    )
    lines: list[str] = []
    sent = threading.Event()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if not sent.is_set() and re.search(r"\bstep [1-9]\d*/\d+", line):
                target = pick(proc) if pick else proc.pid
                os.kill(target, sig)
                sent.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    reader.join(timeout=30)
    err = "".join(lines)
    assert sent.is_set(), f"no training step was logged:\n{err[-3000:]}"
    return code, err


def assert_preempted(code: int, err: str, out: Path, max_steps: int = MAX_STEPS) -> int:
    """Exit 75, one line naming a whole checkpoint that `--resume auto` takes, no student."""
    assert code == PREEMPTED, err[-3000:]
    found = PREEMPTED_LINE.search(flat(err))
    assert found, err[-3000:]
    step, ckpt = int(found.group(1)), Path(found.group(2))
    assert 1 <= step < max_steps
    assert ckpt == out / f"checkpoint-{step}"
    assert checkpoint_problems(ckpt, expected_step=step) == []
    assert find_resume_checkpoint(out, "auto") == ckpt
    assert not (out / "model.safetensors").exists(), "a preempted run saved a student"
    assert not [line for line in err.splitlines() if line.startswith("error:")]
    run = json.loads((out / "openkd_run.json").read_text())
    assert run["status"] == "preempted"
    assert run["preempted"]["step"] == step and run["preempted"]["checkpoint"] == str(ckpt)
    return step


def rerun_resumes(args: list[str], out: Path, step: int, max_steps: int = MAX_STEPS) -> None:
    proc = run_cli(*args, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming from {out / f'checkpoint-{step}'} at step {step} of {max_steps}" in flat(
        proc.stderr
    )
    assert global_step(out) == max_steps
    assert json.loads((out / "openkd_run.json").read_text())["status"] == "complete"


@pytest.fixture(scope="module")
def reference(tiny_model: Path, dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same training, never interrupted."""
    out = tmp_path_factory.mktemp("reference") / "out"
    proc = run_cli(*train_args(tiny_model, dataset, out), env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["sigterm", "sigusr1"])
def test_signal_saves_a_checkpoint_and_the_rerun_ends_like_an_uninterrupted_run(
    sig: int, tiny_model: Path, dataset: Path, reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    args = train_args(tiny_model, dataset, out)
    code, err = signal_during_training(args, sig)
    step = assert_preempted(code, err, out)
    run = json.loads((out / "openkd_run.json").read_text())
    assert run["preempted"]["signal"] == signal.Signals(sig).name

    rerun_resumes(args, out, step)
    assert_same_weights(out, reference)


@pytest.mark.slow
def test_two_processes_save_together_when_one_rank_is_signalled(
    tiny_model: Path, dataset: Path, tmp_path: Path
) -> None:
    """Under `accelerate launch` (DDP, 2 CPU processes) SIGTERM reaches rank 1 only: both
    ranks save the step's checkpoint, and `openkd train` exits 75 with the one line."""
    import psutil

    def rank_one(parent: subprocess.Popen) -> int:
        for child in psutil.Process(parent.pid).children(recursive=True):
            try:
                if child.environ().get("RANK") == "1":
                    return child.pid
            except psutil.Error:
                continue
        raise AssertionError("no rank-1 worker found")

    out = tmp_path / "out"
    args = train_args(tiny_model, dataset, out, "--num-processes", "2", "--batch-size", "4")
    code, err = signal_during_training(args, signal.SIGTERM, pick=rank_one, timeout=900)
    step = assert_preempted(code, err, out)
    ckpt = out / f"checkpoint-{step}"
    assert (ckpt / "rng_state_0.pth").is_file() and (ckpt / "rng_state_1.pth").is_file()
    run = json.loads((out / "openkd_run.json").read_text())
    assert "signal" not in run["preempted"]  # rank 0 was not signalled itself

    rerun_resumes(args, out, step)


@pytest.mark.slow
def test_on_policy_sigterm_saves_and_the_rerun_ends_like_an_uninterrupted_run(
    tiny_model: Path, dataset: Path, tmp_path: Path
) -> None:
    teacher = sharper_copy(tiny_model, tmp_path / "teacher", 4.0)
    max_steps = 5

    def op_args(out: Path) -> list[str]:
        return [
            "train",
            "--student", str(tiny_model),
            "--teacher", str(teacher),
            "--dataset", str(dataset),
            "--output-dir", str(out),
            "--loss", "on-policy",
            "--max-steps", str(max_steps),
            "--save-steps", "100",
            "--batch-size", "4",
            "--max-completion-length", "12",
            "--max-length", "64",
            "--learning-rate", "5e-3",
            "--logging-steps", "1",
            "--seed", "7",
        ]  # fmt: skip

    reference = tmp_path / "reference"
    proc = run_cli(*op_args(reference), env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]

    out = tmp_path / "out"
    code, err = signal_during_training(op_args(out), signal.SIGTERM)
    step = assert_preempted(code, err, out, max_steps)
    rerun_resumes(op_args(out), out, step, max_steps)
    assert_same_weights(out, reference)


# --- fast: the pieces without training ---------------------------------------------------


def _callback(diverged: object = None):
    from types import SimpleNamespace

    from openkd.train.preempt import PreemptOnSignal

    trainer = SimpleNamespace(
        accelerator=SimpleNamespace(num_processes=1), guard=SimpleNamespace(diverged=diverged)
    )
    return PreemptOnSignal(trainer)


def _step_end(callback, step: int = 3, *, last: bool = False):
    from types import SimpleNamespace

    from transformers import TrainerControl

    control = TrainerControl(should_training_stop=last)
    callback.on_step_end(None, SimpleNamespace(global_step=step), control)
    return control


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["sigterm", "sigusr1"])
def test_a_signal_asks_for_a_checkpoint_and_a_stop_at_the_step_end(sig: int) -> None:
    callback = _callback()
    before = signal.getsignal(sig)
    with callback.handling_signals():
        control = _step_end(callback, 2)
        assert not (control.should_save or control.should_training_stop)
        os.kill(os.getpid(), sig)  # only a flag: this process goes on
        control = _step_end(callback, 3)
    assert signal.getsignal(sig) is before  # the handler is removed after training
    assert callback.received == sig and callback.stopped_at == 3
    assert control.should_save and control.should_training_stop and not control.should_evaluate


def test_no_preemption_checkpoint_at_the_last_step_or_after_a_divergence() -> None:
    callback = _callback()
    callback.received = signal.SIGTERM
    control = _step_end(callback, 16, last=True)  # the run ends and saves its student anyway
    assert not control.should_save and callback.stopped_at is None

    diverged = _callback(diverged=object())  # openkd.train.guard: save nothing
    diverged.received = signal.SIGTERM
    control = _step_end(diverged)
    assert not control.should_save and diverged.stopped_at is None


def test_launcher_reports_the_preemption_its_workers_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Behind `accelerate launch` the workers' exit 75 is lost (the launcher exits 1 or
    128 + signal); a run record rewritten as preempted during the launch says it."""
    from openkd import versions
    from openkd.errors import Preempted
    from openkd.train import launch
    from openkd.train.config import TrainConfig
    from openkd.train.launch import relaunch_if_needed

    for name in (
        "LOCAL_RANK",
        "RANK",
        "WORLD_SIZE",
        "ACCELERATE_MIXED_PRECISION",
        "OPENKD_LAUNCHED",
    ):
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "out"
    out.mkdir()
    record = out / "openkd_run.json"
    ckpt = out / "checkpoint-7"
    worker = (
        "import json, os, sys; assert 'SIGUSR1' in os.environ['PET_SIGNALS_TO_HANDLE']; "
        f"json.dump({{'status': 'preempted', 'preempted': {{'step': 7, 'checkpoint': {str(ckpt)!r}}}}}, "
        f"open({str(record)!r}, 'w')); sys.exit(143)"
    )
    monkeypatch.setattr(launch, "launch_command", lambda plan, argv: [sys.executable, "-c", worker])
    monkeypatch.setattr(versions, "check_trl", lambda: None)  # importing TRL takes seconds
    cfg = TrainConfig(student="s", dataset="d", output_dir=out, num_processes=2, bf16=False)
    with pytest.raises(Preempted) as info:
        relaunch_if_needed(cfg, [])
    assert info.value.exit_code == PREEMPTED == 75
    assert str(info.value) == (
        f"preempted at step 7: checkpoint saved to {ckpt}; rerun the same command to resume"
    )

    # The same record left by an earlier run, unchanged since: a failure is not a preemption.
    assert launch._preempted_since(out, launch._run_record_mtime(out)) is None


def test_cli_prints_the_preemption_as_one_line_and_exits_75(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from openkd.errors import Preempted
    from openkd.train import run as train_run
    from tests.helpers import invoke

    def preempted(cfg: object) -> None:
        raise Preempted(5, str(tmp_path / "checkpoint-5"))

    monkeypatch.setattr(train_run, "run", preempted)
    data = tmp_path / "d.jsonl"
    data.write_text("{}\n")
    code, stdout, stderr = invoke(
        "train", "--student", "s", "--dataset", str(data), "--output-dir", str(tmp_path / "o")
    )
    assert code == 75 and stdout == ""
    assert stderr.strip() == (
        f"preempted at step 5: checkpoint saved to {tmp_path / 'checkpoint-5'}; rerun the same "
        "command to resume"
    )


def test_openkd_run_passes_a_preempted_train_stage_on(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from openkd import pipeline
    from openkd.train import launch

    monkeypatch.setattr(launch, "run_child", lambda cmd, env=None: PREEMPTED)
    recipe = tmp_path / "recipe.yaml"
    with pytest.raises(pipeline.StageFailed) as info:
        pipeline._run_stage("train", tmp_path / "train.yaml", recipe, ["eval"])
    assert info.value.exit_code == PREEMPTED
    assert str(info.value) == (
        f"train was preempted (its checkpoint is saved); eval did not run; rerun `openkd run "
        f"{recipe}` to resume"
    )
