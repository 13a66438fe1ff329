"""`openkd train --loss soft|mix` on the tiny model, with a sidecar written from a teacher's top-K.

The teacher is the tiny model with its weights scaled (same tokenizer, sharper distributions),
so its top-K differs from the student's from the first step. Nothing comes from `openkd
generate`: `tests.soft_helpers.write_teacher_logprobs` writes the sidecar with the sidecar's
own writer.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from openkd.data.jsonl import iter_jsonl
from openkd.data.logprobs import SidecarReader, SidecarWriter
from tests.conftest import run_cli, sigkill_once, write_jsonl
from tests.helpers import error_line, invoke
from tests.soft_helpers import sharper_copy, swap_two_tokens, write_teacher_logprobs
from tests.train_helpers import TINY_RUN, train_argv, write_reverse_dataset
from tests.train_resume_helpers import assert_same_weights, flat, global_step

ENV = {"OMP_NUM_THREADS": "1"}
MAX_STEPS = 12
K = 8


@pytest.fixture(scope="module")
def teacher(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return sharper_copy(tiny_model, tmp_path_factory.mktemp("teacher") / "model", 6.0)


@pytest.fixture(scope="module")
def soft_data(teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 reverse-words rows, their top-8 sidecar, and a meta.json naming the teacher."""
    data = write_reverse_dataset(tmp_path_factory.mktemp("soft") / "teacher.jsonl")
    write_teacher_logprobs(teacher, data, k=K, teacher_name=str(teacher))
    return data


def mix_args(student: Path, dataset: Path, out: Path, *extra: str) -> list[str]:
    return train_argv(
        student, dataset, out, *extra,
        base=TINY_RUN, loss="mix", kd_alpha="0.3", kd_temperature="2", max_steps=MAX_STEPS,
        save_steps=4, save_total_limit=3, learning_rate="5e-3",
    )  # fmt: skip


@pytest.fixture(scope="module")
def reference(tiny_model: Path, soft_data: Path, tmp_path_factory) -> tuple[Path, str]:
    """An uninterrupted `openkd train --loss mix` from the CLI."""
    out = tmp_path_factory.mktemp("mix") / "out"
    proc = run_cli(*mix_args(tiny_model, soft_data, out), env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines() == [str(out)]
    return out, proc.stderr


@pytest.mark.slow
def test_mix_trains_from_the_cli(reference: tuple[Path, str], teacher: Path) -> None:
    out, stderr = reference
    err = flat(stderr)
    assert "pre-flight 2/3: the teacher's log-probabilities (--loss mix)" in err
    assert f"top-{K} float16 in" in err and "for all 64 rows" in err
    assert f"the teacher's tokenizer ({teacher}) maps all its" in err
    assert "(the answer is the teacher's own token ids)" in err
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    steps = [e for e in history if "loss" in e]
    assert len(steps) == MAX_STEPS
    losses = [e["loss"] for e in steps]
    assert all(np.isfinite(losses)) and losses[-1] < 0.8 * losses[0], losses
    assert all(np.isfinite(e["kl"]) and 0 <= e["top1_agreement"] <= 1 for e in steps)
    assert steps[0]["kl"] > 0.01  # the teacher is not the student
    run = json.loads((out / "openkd_run.json").read_text())
    settings = run["identity"]["settings"]
    assert (settings["loss"], settings["kd_alpha"], settings["kd_temperature"]) == ("mix", 0.3, 2)
    card = (out / "README.md").read_text()
    assert "mix: 0.3 × CE + 0.7 × T²·KL(teacher top-8 + rest ‖ student), T=2" in card


@pytest.mark.slow
def test_mix_sigkill_then_rerun_resumes_like_an_uninterrupted_run(
    tiny_model: Path, soft_data: Path, reference: tuple[Path, str], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    args = mix_args(tiny_model, soft_data, out)
    # Killed as soon as the first checkpoint is complete (trainer_state.json is written last).
    sigkill_once(*args, written=out / "checkpoint-4" / "trainer_state.json", env=ENV)
    assert not (out / "model.safetensors").exists(), "the run finished before the kill"

    resumed = run_cli(*args, env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    found = re.search(
        r"resuming from \S+checkpoint-(\d+) at step (\d+) of 12", flat(resumed.stderr)
    )
    assert found and int(found.group(1)) >= 4, resumed.stderr[-3000:]
    assert global_step(out) == MAX_STEPS
    assert_same_weights(out, reference[0])


def test_soft_with_lora_trains_the_adapter(
    tiny_model: Path, soft_data: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    out = tmp_path / "lora"
    code, stdout, err = invoke(
        *train_argv(
            tiny_model, soft_data, out, loss="soft", lora=True, lora_r=4, max_steps=3,
            batch_size=8, learning_rate="1e-2", save_steps=3, eval_fraction="0.1", eval_steps=3,
        )
    )  # fmt: skip
    assert code == 0, err[-3000:]
    assert stdout.strip() == str(out)
    adapter = load_file(out / "adapter_model.safetensors")
    assert any(name.endswith("lora_B.weight") and v.abs().sum() > 0 for name, v in adapter.items())
    results = json.loads((out / "openkd_run.json").read_text())["results"]
    assert results["global_step"] == 3 and np.isfinite(results["final_loss"])
    assert results["eval_loss"] is not None and np.isfinite(results["eval_loss"])


def test_examples_use_the_teachers_ids_and_the_collator_aligns_its_top_k(
    tiny_model: Path, soft_data: Path, tmp_path: Path
) -> None:
    """The answer is the sidecar's ids, never re-tokenised; teacher row j sits at label j."""
    import torch

    from openkd.config import resolve
    from openkd.train.config import TrainConfig
    from openkd.train.prepare import build_trainer, prepare

    # Rewrite one row's answer ids as a non-canonical tokenisation: one token per character.
    rows = [row for _, row in iter_jsonl(soft_data)][:6]
    data = write_jsonl(tmp_path / "odd.jsonl", rows)
    shutil.copy(soft_data.with_name("teacher.meta.json"), tmp_path / "odd.meta.json")
    reader = SidecarReader(soft_data.with_name("teacher.logprobs"))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    odd_text = rows[0]["completion"][0]["content"]
    odd_ids = [tokenizer.convert_tokens_to_ids(c) for c in odd_text.replace(" ", "Ġ")]
    assert tokenizer.decode(odd_ids) == odd_text and odd_ids != tokenizer(odd_text)["input_ids"]
    with SidecarWriter(tmp_path / "odd.logprobs", K) as writer:
        for i, row in enumerate(rows):
            stored = reader[row["id"]]
            if i == 0:  # no end-of-turn token at the end: openkd appends one, without teacher
                t = len(odd_ids)
                writer.add(row["id"], odd_ids, stored.top_ids[:1].repeat(t, 0),
                           stored.top_logprobs[:1].repeat(t, 0))  # fmt: skip
            else:
                writer.add(row["id"], stored.token_ids, stored.top_ids, stored.top_logprobs)

    cfg = resolve(
        TrainConfig,
        None,
        {"student": str(tiny_model), "dataset": str(data), "output_dir": tmp_path / "o",
         "loss": "soft"},
    )  # fmt: skip
    trainer = build_trainer(prepare(cfg, str(tiny_model)))
    odd_reader = SidecarReader(tmp_path / "odd.logprobs")
    examples = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    batch = trainer.data_collator(examples)
    eos = tokenizer.eos_token_id
    for b, example in enumerate(examples):
        stored = odd_reader[example["id"]]
        start = example["kd_start"]
        tokens = stored.token_ids.tolist()
        answer = tokens + ([eos] if tokens[-1] != eos else [])
        labels = batch["labels"][b]
        assert batch["input_ids"][b][labels != -100].tolist() == answer
        assert labels[:start].eq(-100).all()
        mask = batch["teacher_mask"][b]
        assert mask.nonzero().flatten().tolist() == list(range(start, start + len(tokens)))
        assert torch.equal(
            batch["teacher_ids"][b, start : start + len(tokens)],
            torch.tensor(stored.top_ids.tolist()),
        )
        assert torch.allclose(
            batch["teacher_logprobs"][b, start : start + len(tokens)],
            torch.tensor(stored.top_logprobs.tolist()),
        )
        if example["id"] == rows[0]["id"]:
            assert tokens == odd_ids and not mask[start + len(tokens)]  # the appended EOS
    # the loss runs on that batch, and is finite
    loss = trainer.compute_loss(trainer.model, {k: v for k, v in batch.items()})
    assert torch.isfinite(loss)


def test_tokenizer_mismatch_is_a_one_line_error(
    tiny_model: Path, soft_data: Path, tmp_path: Path
) -> None:
    student = swap_two_tokens(tiny_model, tmp_path / "student")
    out = tmp_path / "out"
    # --cross-tokenizer auto would align them by text
    code, stdout, err = invoke(
        *train_argv(student, soft_data, out, loss="mix", cross_tokenizer="off")
    )
    line = error_line(err)
    assert code == 1 and stdout == ""
    assert "and the student tokenize differently: 2 of the teacher's 2,000 tokens" in line
    assert "have another id in the student" in line and line.endswith("use --loss hard")
    assert not (out / "model.safetensors").exists()


def test_unloadable_teacher_tokenizer_warns_and_ids_are_still_checked(
    tiny_model: Path, soft_data: Path, tmp_path: Path
) -> None:
    data = Path(shutil.copy(soft_data, tmp_path / "labels.jsonl"))
    shutil.copytree(soft_data.with_name("teacher.logprobs"), tmp_path / "labels.logprobs")
    meta = {"teacher": {"name": "org/teacher-72b"}}  # a Hub id: offline in tests
    (tmp_path / "labels.meta.json").write_text(json.dumps(meta))
    common = ["--loss", "soft", "--max-steps", "1", "--batch-size", "4", "--save-steps", "1"]
    code, _, err = invoke(*train_argv(tiny_model, data, tmp_path / "a", *common))
    assert code == 0, err[-3000:]
    text = flat(err)
    assert "could not load the teacher's tokenizer org/teacher-72b" in text
    assert "only the teacher's token ids are checked against the student's vocabulary" in text

    # An id beyond the student's vocabulary: refused before any weights are loaded.
    rows = [row for _, row in iter_jsonl(data)]
    shutil.rmtree(tmp_path / "labels.logprobs")
    with SidecarWriter(tmp_path / "labels.logprobs", K) as writer:
        for row in rows:
            writer.add(row["id"], [5, 2], [[2400] + [1] * (K - 1)] * 2, [[-0.1] * K] * 2)
    code, _, err = invoke(*train_argv(tiny_model, data, tmp_path / "b", *common))
    line = error_line(err)
    assert code == 1
    assert "name token id 2400, but the student's vocabulary has 2,000 tokens" in line
    assert line.endswith("use --loss hard")


@pytest.mark.parametrize(
    "case,expected",
    [
        ("no_sidecar", r"there is no \S+labels.logprobs/ beside --dataset .*--logprobs DIR"),
        ("missing_rows", r"2 of 64 rows of --dataset \S+ have no teacher log-probabilities"),
        ("packing", r"--packing does not work with --loss mix: .*use --loss hard"),
        ("alpha_with_soft", r"--kd-alpha weighs the two terms of --loss mix; --loss soft is"),
        ("temperature_with_hard", r"--kd-temperature applies to --loss soft\|mix\|on-policy only"),
        ("logprobs_missing", r"--logprobs \S+: no such directory"),
    ],
)
def test_soft_label_errors_are_one_line(case, expected, tiny_model, soft_data, tmp_path):
    data = Path(shutil.copy(soft_data, tmp_path / "labels.jsonl"))
    extra = ["--loss", "mix"]
    if case == "missing_rows":
        rows = [row for _, row in iter_jsonl(soft_data)]
        reader = SidecarReader(soft_data.with_name("teacher.logprobs"))
        with SidecarWriter(tmp_path / "labels.logprobs", K) as writer:
            for row in rows[2:]:
                stored = reader[row["id"]]
                writer.add(row["id"], stored.token_ids, stored.top_ids, stored.top_logprobs)
    elif case == "packing":
        extra += ["--packing"]
    elif case == "alpha_with_soft":
        extra = ["--loss", "soft", "--kd-alpha", "0.5"]
    elif case == "temperature_with_hard":
        extra = ["--kd-temperature", "2"]
    elif case == "logprobs_missing":
        extra += ["--logprobs", str(tmp_path / "nowhere")]
    out = tmp_path / "out"
    code, stdout, err = invoke(*train_argv(tiny_model, data, out, *extra))
    assert code in (1, 2) and stdout == ""
    assert re.search(expected, error_line(err)), error_line(err)
    assert not (out / "model.safetensors").exists()


@pytest.mark.slow
def test_zero3_two_processes_match_one_process_step_by_step(
    tiny_model: Path, soft_data: Path, tmp_path: Path
) -> None:
    """DeepSpeed ZeRO-3 over 2 CPU processes (batch 4 each) against 1 process (batch 8).

    Both see the same 8 rows per step, so every step's loss and gradient norm must agree:
    the LM head, sharded by ZeRO-3, is gathered for the chunked loss and its gradient reduced.
    """

    def run(out: Path, batch_size: int, *launch: str) -> list[dict]:
        args = mix_args(tiny_model, soft_data, out, *launch)
        for flag, value in (("--max-steps", 4), ("--save-steps", 4), ("--batch-size", batch_size)):
            args[args.index(flag) + 1] = str(value)
        proc = run_cli(*args, env=ENV, timeout=900)
        assert proc.returncode == 0, proc.stderr[-4000:]
        history = json.loads((out / "trainer_state.json").read_text())["log_history"]
        return [e for e in history if "loss" in e]

    zero3 = run(tmp_path / "zero3", 4, "--deepspeed", "zero3", "--num-processes", "2")
    single = run(tmp_path / "single", 8)
    assert len(zero3) == len(single) == 4
    for a, b in zip(zero3, single, strict=True):
        for key in ("loss", "grad_norm", "kl", "ce"):
            assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-6), (key, a, b)
    assert zero3[0]["kl"] > 0.01
    assert (tmp_path / "zero3" / "checkpoint-4" / "latest").is_file()
    assert_same_weights_close(tmp_path / "zero3", tmp_path / "single")


def assert_same_weights_close(a: Path, b: Path) -> None:
    import torch
    from safetensors.torch import load_file

    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.allclose(wa[name], wb[name], rtol=1e-3, atol=1e-5), name
