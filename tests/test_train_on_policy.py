"""`openkd train --loss on-policy` on the tiny model: the student samples, a teacher scores.

The teacher is the tiny model with its weights scaled (same tokenizer, sharper distributions),
so the divergence is far from zero from the first step. The dataset is an `openkd generate`
style file of reverse-the-words rows (its answers are read only for offline steps).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from tests.conftest import run_cli, sigkill_once, write_jsonl
from tests.helpers import error_line, invoke
from tests.soft_helpers import sharper_copy, swap_two_tokens
from tests.train_helpers import train_argv, write_reverse_dataset
from tests.train_resume_helpers import assert_same_weights, flat, global_step

ENV = {"OMP_NUM_THREADS": "1"}
MAX_STEPS = 6


@pytest.fixture(scope="module")
def teacher(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return sharper_copy(tiny_model, tmp_path_factory.mktemp("teacher") / "model", 4.0)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_reverse_dataset(tmp_path_factory.mktemp("data") / "labels.jsonl")


def op_args(student: Path, teacher: Path, dataset: Path, out: Path, *extra: str) -> list[str]:
    return train_argv(
        student, dataset, out, *extra,
        teacher=teacher, loss="on-policy", max_steps=MAX_STEPS, save_steps=2, save_total_limit=3,
        batch_size=4, max_completion_length=12, max_length=64, learning_rate="5e-3",
        logging_steps=2, seed=7,
    )  # fmt: skip


@pytest.fixture(scope="module")
def reference(tiny_model: Path, teacher: Path, data: Path, tmp_path_factory) -> tuple[Path, str]:
    """An uninterrupted on-policy run from the CLI."""
    out = tmp_path_factory.mktemp("op") / "out"
    proc = run_cli(*op_args(tiny_model, teacher, data, out), env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines() == [str(out)]
    return out, proc.stderr


@pytest.mark.slow
def test_on_policy_trains_and_reports_the_reverse_kl(
    reference: tuple[Path, str], teacher: Path
) -> None:
    out, stderr = reference
    err = flat(stderr)
    assert "pre-flight 2/3: the teacher (--loss on-policy)" in err
    assert f"the teacher's tokenizer ({teacher}) maps all its 2,000 tokens" in err
    assert "the loss covers every sampled token up to and including it" in err
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    logged = [e for e in history if "loss" in e]
    assert [e["step"] for e in logged] == [1, 2, 4, 6]
    # beta 1 and T 1: the loss of step 1 is the reverse KL measured on the same samples
    assert logged[0]["reverse_kl"] == pytest.approx(logged[0]["loss"], rel=1e-4)
    assert all(np.isfinite(e["reverse_kl"]) and e["reverse_kl"] > 0.05 for e in logged)
    assert all(0 <= e["score_share"] < 1 and 0 < e["generate_share"] < 1 for e in logged)
    run = json.loads((out / "openkd_run.json").read_text())
    settings = run["identity"]["settings"]
    assert settings["loss"] == "on-policy" and settings["kd_beta"] == 1.0
    assert settings["teacher"]["model"] == str(teacher)
    assert len(settings["teacher"]["weights_sha256"]) == 16
    results = run["results"]
    assert results["reverse_kl_start"] == logged[0]["reverse_kl"]
    assert results["reverse_kl_end"] == logged[-1]["reverse_kl"]
    assert results["tokens_per_second"] > 0 and 0 < results["score_share"] < 1
    assert "reverse KL per token (own samples)" in err and "step time: sampling / teacher" in err
    card = (out / "README.md").read_text()
    assert f"distilled from the teacher **{teacher}** with openkd on-policy distillation" in card
    assert "reverse KL(student ‖ teacher) per token on the student's own samples" in card
    assert "on-policy-distillation" in card
    # the saved student still stops at its end-of-turn token
    generation = json.loads((out / "generation_config.json").read_text())
    assert 2 in ([generation["eos_token_id"]] if isinstance(generation["eos_token_id"], int) else
                 generation["eos_token_id"])  # fmt: skip


@pytest.mark.slow
def test_on_policy_sigkill_then_rerun_resumes_like_an_uninterrupted_run(
    tiny_model: Path, teacher: Path, data: Path, reference: tuple[Path, str], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    args = op_args(tiny_model, teacher, data, out)
    sigkill_once(*args, written=out / "checkpoint-2" / "trainer_state.json", env=ENV)
    assert not (out / "model.safetensors").exists(), "the run finished before the kill"

    resumed = run_cli(*args, env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    found = re.search(
        rf"resuming from \S+checkpoint-(\d+) at step (\d+) of {MAX_STEPS}", flat(resumed.stderr)
    )
    assert found and int(found.group(1)) >= 2, resumed.stderr[-3000:]
    assert global_step(out) == MAX_STEPS
    # sampling resumes with the checkpoint's random state: the same samples, the same weights
    assert_same_weights(out, reference[0])

    # another teacher makes the checkpoints another run's: refused, naming the difference
    other = sharper_copy(teacher, tmp_path / "other-teacher", 1.5)
    again = run_cli(*op_args(tiny_model, other, data, out), env=ENV)
    line = error_line(again.stderr)
    assert again.returncode == 1 and "holds a different run (teacher" in line


@pytest.mark.slow
def test_lora_offline_steps_and_samples_per_prompt(
    tiny_model: Path, teacher: Path, data: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    out = tmp_path / "lora"
    code, stdout, err = invoke(
        *op_args(tiny_model, teacher, data, out, "--lora", "--lora-r", "4", "--num-samples", "2",
                 "--kd-lambda", "0", "--kd-beta", "0.5", "--eval-fraction", "0.1",
                 "--eval-steps", "6"),
    )  # fmt: skip
    assert code == 0, err[-3000:]
    assert stdout.strip() == str(out)
    adapter = load_file(out / "adapter_model.safetensors")
    assert any(name.endswith("lora_B.weight") and v.abs().sum() > 0 for name, v in adapter.items())
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    steps = [e for e in history if "loss" in e]
    # --kd-lambda 0: every step scores the dataset's answers (reverse words + EOS), nothing
    # sampled, so no reverse KL on the student's own samples is measured
    assert all("reverse_kl" not in e for e in steps)
    assert all(e["completions/clipped_ratio"] == 0 for e in steps)
    evals = [e for e in history if "eval_loss" in e]
    assert evals and np.isfinite(evals[-1]["eval_reverse_kl"])  # eval samples on-policy
    assert "GKD lambda 0" in (out / "README.md").read_text()


def test_offline_steps_follow_the_seed_and_lambda() -> None:
    from openkd.train.onpolicy.trainer import OpenkdOnPolicyTrainer

    def offline(lmbda: float, seed: int = 7) -> list[bool]:
        fake = SimpleNamespace(lmbda=lmbda, args=SimpleNamespace(seed=seed))
        return [OpenkdOnPolicyTrainer.step_is_offline(fake, step) for step in range(400)]  # type: ignore[arg-type]

    assert not any(offline(1.0)) and all(offline(0.0))
    mixed = offline(0.75)
    assert mixed == offline(0.75)  # the same on every process and after a resume
    assert 0.15 < sum(mixed) / len(mixed) < 0.35
    assert mixed != offline(0.75, seed=8)


def test_samples_per_prompt_repeat_each_prompt_in_a_step() -> None:
    from openkd.train.onpolicy.trainer import OpenkdOnPolicyTrainer

    fake = SimpleNamespace(
        samples_per_prompt=3,
        args=SimpleNamespace(per_device_train_batch_size=6, gradient_accumulation_steps=1, seed=1),
        accelerator=SimpleNamespace(num_processes=1),
        train_dataset=list(range(10)),
        shuffle_dataset=True,
    )
    order = list(OpenkdOnPolicyTrainer._get_train_sampler(fake))  # type: ignore[arg-type]
    steps = [order[i : i + 6] for i in range(0, len(order), 6)]
    assert len(steps) == 5  # 10 prompts, 2 per step of 6 samples
    for step in steps:
        assert len(set(step)) == 2 and all(step.count(i) == 3 for i in set(step))
    assert sorted(set(order)) == list(range(10))


def _other_head_size(model_dir: Path, out: Path) -> Path:
    shutil.copytree(model_dir, out)
    config = json.loads((out / "config.json").read_text())
    config["vocab_size"] = 2048
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize(
    "case,expected",
    [
        ("no_teacher", r"--loss on-policy needs --teacher MODEL"),
        ("teacher_with_hard", r"--teacher applies to --loss on-policy only"),
        ("tokenizers_differ", r"and the student tokenize differently: 2 tokens differ .*"
         r"drop --cross-tokenizer off to align the two by text \(TRL's GOLD trainer\)$"),
        # a config whose head size is not its weights' (a padded head that fits trains:
        # tests/test_train_on_policy_crosstok.py)
        ("head_sizes_differ", r"--teacher \S+: could not load its weights"),
        ("teacher_missing", r"--teacher \S+: no such directory"),
        ("no_prompt_column", r"has no 'prompt' column .*--loss on-policy samples answers"),
        ("offline_needs_answers", r"has no 'completion' column"),
        ("packing", r"--packing does not work with --loss on-policy"),
        ("completion_too_long", r"--max-completion-length 64 leaves no room for a prompt"),
        ("samples_divide_batch", r"--num-samples 3 must divide --batch-size"),
        ("owned_trl_field", r"sft_args.beta: openkd sets this itself; use --kd-beta"),
        ("unknown_trl_field", r"sft_args.lmbda is not a trl.DistillationConfig"),
    ],
)  # fmt: skip
def test_on_policy_errors_are_one_line(case, expected, tiny_model, teacher, data, tmp_path):
    student, teacher_dir, dataset = tiny_model, teacher, data
    extra = ["--loss", "on-policy", "--teacher", str(teacher_dir)]
    config: dict = {}
    if case == "no_teacher":
        extra = ["--loss", "on-policy"]
    elif case == "teacher_with_hard":
        extra = ["--teacher", str(teacher_dir)]
    elif case == "tokenizers_differ":
        student = swap_two_tokens(tiny_model, tmp_path / "student")
        extra += ["--cross-tokenizer", "off"]
    elif case == "head_sizes_differ":
        extra[-1] = str(_other_head_size(teacher_dir, tmp_path / "wide"))
    elif case == "teacher_missing":
        extra[-1] = str(tmp_path / "nowhere")
    elif case == "no_prompt_column":
        dataset = write_jsonl(tmp_path / "q.jsonl", [{"question": "Reverse the words: a b"}])
    elif case == "offline_needs_answers":
        dataset = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Reverse the words: a b"}] * 4)
        extra += ["--kd-lambda", "0.5"]
    elif case == "packing":
        extra += ["--packing"]
    elif case == "completion_too_long":
        extra += ["--max-completion-length", "64", "--max-length", "64"]
    elif case == "samples_divide_batch":
        extra += ["--num-samples", "3", "--batch-size", "4"]
    elif case in ("owned_trl_field", "unknown_trl_field"):
        key = "beta" if case == "owned_trl_field" else "lmbda"
        config = {"train": {"sft_args": {key: 0.5}}}
    if config:
        (tmp_path / "c.yaml").write_text(json.dumps(config))
        extra += ["--config", str(tmp_path / "c.yaml")]
    out = tmp_path / "out"
    code, stdout, err = invoke(*train_argv(student, dataset, out, *extra))
    assert code in (1, 2) and stdout == ""
    assert re.search(expected, error_line(err)), error_line(err)
    assert not (out / "model.safetensors").exists()


def test_a_text_prompt_dataset_is_read_as_user_messages(tmp_path: Path) -> None:
    from openkd.train.config import TrainConfig
    from openkd.train.onpolicy.data import load_prompt_data

    path = write_jsonl(
        tmp_path / "p.jsonl", [{"prompt": f"Reverse the words: a b {i}"} for i in range(10)]
    )
    cfg = TrainConfig(
        student="s", dataset=str(path), loss="on-policy", teacher="t", eval_fraction=0.2
    )
    data = load_prompt_data(cfg)
    assert len(data.train) == 8 and data.eval is not None and len(data.eval) == 2
    assert data.train.column_names == ["prompt"]
    assert data.train[0]["prompt"][0]["role"] == "user"
    assert data.train[0]["prompt"][0]["content"].startswith("Reverse the words: a b ")
    assert data.fingerprint == load_prompt_data(cfg).fingerprint


@pytest.mark.slow
def test_zero3_two_processes_shard_the_teacher_and_resume(
    tiny_model: Path, teacher: Path, data: Path, tmp_path: Path
) -> None:
    """DeepSpeed ZeRO-3 over 2 CPU processes: TRL's `prepare_deepspeed` shards the teacher
    too, every process samples its own answers, and a rerun resumes from the sharded
    checkpoint. (Samples depend on the process count, so there is no step-by-step match with
    one process as for hard and soft labels.)"""
    out = tmp_path / "zero3"
    args = op_args(tiny_model, teacher, data, out, "--deepspeed", "zero3", "--num-processes", "2")
    args[args.index("--max-steps") + 1] = "4"
    args[args.index("--logging-steps") + 1] = "1"
    first = run_cli(*args, env={**ENV, "COLUMNS": "250"}, timeout=900)
    assert first.returncode == 0, first.stderr[-4000:]
    err = flat(first.stderr)
    assert "teacher placement │ DeepSpeed ZeRO-3 inference engine, parameters sharded over 2" in err
    assert (out / "checkpoint-4" / "latest").is_file()  # DeepSpeed's sharded checkpoint
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    logged = [e for e in history if "loss" in e]
    # gathered over both processes: with beta 1 and T 1 the metric is the loss
    assert all(e["reverse_kl"] == pytest.approx(e["loss"], rel=1e-4) for e in logged)
    # 2 more steps: resumed from the sharded checkpoint, not from step 0
    args[args.index("--max-steps") + 1] = "6"
    more = run_cli(*args, env=ENV, timeout=900)
    assert more.returncode == 0, more.stderr[-4000:]
    assert re.search(r"resuming from \S+checkpoint-4 at step 4\b", flat(more.stderr))
    assert global_step(out) == 6
