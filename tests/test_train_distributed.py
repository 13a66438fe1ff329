"""Multi-process `openkd train` on CPU: DeepSpeed ZeRO-3 with 2 processes (DDP with 2:
tests/test_train_preempt.py's two-process runs).

The runs use the shipped configs unchanged: `--deepspeed zero3` resolves configs/accelerate/
zero3.yaml, and with no CUDA device openkd launches it with mixed precision off (the YAML's
bf16 is for GPU nodes). DeepSpeed talks over gloo here and builds a small C++ extension on
first use (about a minute, once per machine).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from openkd.errors import OpenkdError
from openkd.train.checkpoints import find_resume_checkpoint
from openkd.train.integrity import checkpoint_problems, deepspeed_world_size
from tests.conftest import run_cli
from tests.train_helpers import TINY_RUN, train_argv, write_reverse_dataset
from tests.train_resume_helpers import assert_same_weights, flat, global_step

pytestmark = pytest.mark.slow

ENV = {"OMP_NUM_THREADS": "1"}
MAX_STEPS = 10
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "accelerate"


def zero3_args(tiny_model: Path, dataset: Path, out: Path, *extra: str) -> list[str]:
    return train_argv(
        tiny_model, dataset, out, *extra,
        base=TINY_RUN, deepspeed="zero3", num_processes=2, max_steps=MAX_STEPS, save_steps=2,
        save_total_limit=3, batch_size=4,
    )  # fmt: skip


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_reverse_dataset(tmp_path_factory.mktemp("data") / "train.jsonl")


@pytest.fixture(scope="module")
def zero3_run(
    tiny_model: Path,
    dataset: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    out = tmp_path_factory.mktemp("zero3") / "out"
    started = time.monotonic()
    proc = run_cli(*zero3_args(tiny_model, dataset, out), env=ENV, timeout=900)
    wall = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr[-4000:]
    print(f"ZeRO-3, 2 processes, {MAX_STEPS} steps: {wall:.1f} s wall")
    err = flat(proc.stderr)
    assert "launching: python -m accelerate.commands.launch --config_file" in err
    assert "zero3.yaml --num_processes 2 --mixed_precision no" in err
    assert proc.stdout.strip().splitlines()[-1] == str(out)
    return out


def test_zero3_student_loads_and_generates(zero3_run: Path, tiny_model: Path) -> None:
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert global_step(zero3_run) == MAX_STEPS
    # zero3_save_16bit_model gathered the shards into one loadable file.
    trained = load_file(zero3_run / "model.safetensors")
    base = load_file(tiny_model / "model.safetensors")
    assert trained.keys() == base.keys()
    assert any(not torch.equal(trained[k], base[k]) for k in base), "weights did not change"

    model = AutoModelForCausalLM.from_pretrained(zero3_run)
    tok = AutoTokenizer.from_pretrained(zero3_run)
    assert model.generation_config.eos_token_id in (tok.eos_token_id, [tok.eos_token_id])
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "Reverse the words: green river stone"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]


def test_zero3_checkpoint_layout_is_validated(zero3_run: Path, tmp_path: Path) -> None:
    ckpt = zero3_run / f"checkpoint-{MAX_STEPS}"
    assert (ckpt / "latest").read_text().strip() == f"global_step{MAX_STEPS}"
    shards = sorted(p.name for p in (ckpt / f"global_step{MAX_STEPS}").iterdir())
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt" in shards
    assert checkpoint_problems(ckpt, expected_step=MAX_STEPS) == []
    assert deepspeed_world_size(ckpt) == 2
    assert find_resume_checkpoint(zero3_run, "auto", world_size=2, deepspeed=True) == ckpt

    tag = f"global_step{MAX_STEPS}"
    tears = {
        "no DeepSpeed 'latest' tag file": lambda c: (c / "latest").unlink(),
        "DeepSpeed 'latest' tag file is empty": lambda c: (c / "latest").write_text(""),
        f"{tag}/ lacks the optimizer state shards of rank(s) [1]": lambda c: (
            c / tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
        ).unlink(),
        f"{tag}/ lacks the model state shards of rank(s) [1]": lambda c: (
            c / tag / "zero_pp_rank_1_mp_rank_00_model_states.pt"
        ).unlink(),
        f"{tag}/zero_pp_rank_0_mp_rank_00_optim_states.pt is empty": lambda c: (
            c / tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
        ).write_bytes(b""),
    }
    for expected, tear in tears.items():
        copy = Path(shutil.copytree(ckpt, tmp_path / expected.replace("/", "_") / ckpt.name))
        tear(copy)
        assert expected in checkpoint_problems(copy, expected_step=MAX_STEPS), expected


def test_zero3_checkpoint_needs_the_same_launch(zero3_run: Path) -> None:
    with pytest.raises(OpenkdError, match="rerun with --num-processes 2"):
        find_resume_checkpoint(zero3_run, "auto", world_size=4, deepspeed=True)
    with pytest.raises(OpenkdError, match="this run does not use DeepSpeed"):
        find_resume_checkpoint(zero3_run, "auto", world_size=1, deepspeed=False)


def _cpu_variant_of_zero3(path: Path) -> Path:
    """The shipped zero3.yaml with only what a CPU needs changed: no bf16, 2 processes.

    openkd makes the same change itself when it launches (mixed precision follows --bf16,
    auto = off without CUDA); a user running `accelerate launch` directly edits the file.
    """
    import yaml

    settings = yaml.safe_load((CONFIG_DIR / "zero3.yaml").read_text())
    settings.update(mixed_precision="no", num_processes=2)
    path.write_text(yaml.safe_dump(settings))
    return path


def test_zero3_sigkill_then_accelerate_launch_resumes_the_same_run(
    zero3_run: Path, tiny_model: Path, dataset: Path, tmp_path: Path
) -> None:
    """Kill -9 the `openkd train` parent mid-run: no worker survives it, and a rerun (here
    with `accelerate launch -m openkd train` directly) resumes every rank's ZeRO-3 shard and
    ends with the uninterrupted run's weights."""
    import psutil

    out = tmp_path / "out"
    args = zero3_args(tiny_model, dataset, out)
    parent = subprocess.Popen(
        [sys.executable, "-m", "openkd", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **ENV},
        start_new_session=True,
    )
    try:
        first = out / "checkpoint-2" / "trainer_state.json"
        deadline = time.monotonic() + 600
        while not first.exists():
            assert parent.poll() is None, "training ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint within 600 s"
            time.sleep(0.02)
        workers = psutil.Process(parent.pid).children(recursive=True)
        parent.kill()
        assert parent.wait(timeout=60) == -signal.SIGKILL
        # The launcher gets SIGTERM from Linux when its parent dies and stops the workers.
        _, alive = psutil.wait_procs(workers, timeout=120)
        assert not alive, f"orphaned processes: {alive}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(parent.pid, signal.SIGKILL)
    assert len(workers) >= 3  # accelerate's launcher and two training processes
    assert not (out / "model.safetensors").exists(), "the run finished before the kill"

    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(_cpu_variant_of_zero3(tmp_path / "zero3_cpu.yaml")),
        "--main_process_port", str(_free_port()),
        "-m", "openkd", *args,
    ]  # fmt: skip
    started = time.monotonic()
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, **ENV}, timeout=900
    )
    wall = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr[-4000:]
    err = flat(proc.stderr)
    assert "launching:" not in err  # already under a launcher: trains in place
    found = re.search(r"resuming from (\S+) at step (\d+) of 10", err)
    assert found, proc.stderr[-4000:]
    step = int(found.group(2))
    assert Path(found.group(1)) == out / f"checkpoint-{step}" and step >= 2
    print(f"ZeRO-3 resume from step {step} of {MAX_STEPS}: {wall:.1f} s wall")
    assert global_step(out) == MAX_STEPS
    assert checkpoint_problems(out / f"checkpoint-{MAX_STEPS}", expected_step=MAX_STEPS) == []
    assert_same_weights(out, zero3_run)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_failing_workers_exit_code_comes_back(
    zero3_run: Path,
    tiny_model: Path,
    dataset: Path,
    tmp_path: Path,
) -> None:
    """Resuming a 2-process ZeRO-3 checkpoint with 1 process fails in the worker, clearly."""
    out = Path(shutil.copytree(zero3_run, tmp_path / "out"))
    args = zero3_args(tiny_model, dataset, out)
    args[args.index("--num-processes") + 1] = "1"
    proc = run_cli(*args, env={**ENV, "PYTHONWARNINGS": "ignore"}, timeout=900)
    assert proc.returncode == 1, proc.stderr[-4000:]
    err = flat(proc.stderr)
    assert "was written by 2 DeepSpeed process(es) but this run has 1" in err
    assert "rerun with --num-processes 2" in err
    assert "training under `accelerate launch` failed (exit code 1)" in err
    # Refused before any step: the finished run's files are untouched.
    assert global_step(out) == MAX_STEPS
    assert_same_weights(out, zero3_run)
