"""The output directory's run record, the model card, and the Trainer log line."""

from __future__ import annotations

import json

import pytest

from openkd.config import resolve
from openkd.errors import OpenkdError
from openkd.train.card import CardInfo, render_card
from openkd.train.config import TrainConfig
from openkd.train.runinfo import (
    RUN_FILE,
    check_output_dir,
    check_output_dir_usable,
    clear_output_dir,
    identity,
    write_run,
)


def ident(**values):
    cfg = resolve(TrainConfig, None, {"student": "s", "dataset": "d", **values})
    return identity(cfg, student="/models/s", dataset_fingerprint="abc", template="{{ x }}")


def test_same_run_resumes_and_a_different_one_is_refused(tmp_path):
    out = tmp_path / "out"
    assert check_output_dir(out, ident(), overwrite=False) is False  # nothing there yet
    write_run(out, ident(), status="running")
    assert check_output_dir(out, ident(), overwrite=False) is True
    # Steps, saving and logging may change between reruns of one run.
    assert check_output_dir(out, ident(max_steps=99, save_steps=3), overwrite=False) is True
    with pytest.raises(OpenkdError) as err:
        check_output_dir(out, ident(learning_rate=1e-4, lora=True), overwrite=False)
    msg = str(err.value)
    assert "holds a different run" in msg and "learning_rate 2e-05 (now 0.0001)" in msg
    assert "lora False (now True)" in msg and "--overwrite" in msg
    assert check_output_dir(out, ident(learning_rate=1e-4), overwrite=True) is False


def test_checkpoints_of_an_unknown_run_are_refused(tmp_path):
    (tmp_path / "checkpoint-500").mkdir()
    with pytest.raises(OpenkdError, match=r"holds checkpoint-500 but no openkd_run.json"):
        check_output_dir(tmp_path, ident(), overwrite=False)


def test_overwrite_clears_only_what_a_run_wrote(tmp_path):
    write_run(tmp_path, ident(), status="complete")
    for name in ("checkpoint-2", "checkpoint-4", "merged", "runs"):
        (tmp_path / name).mkdir()
    for name in ("model.safetensors", "config.json", "README.md", "notes.txt"):
        (tmp_path / name).write_text("x")
    (tmp_path / "model-00001-of-00002.safetensors").write_text("x")
    removed = clear_output_dir(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert RUN_FILE in removed and "checkpoint-4" in removed


def test_run_record_keeps_its_start_and_adds_results(tmp_path):
    write_run(tmp_path, ident(), status="running")
    started = json.loads((tmp_path / RUN_FILE).read_text())["started_at"]
    write_run(tmp_path, ident(), status="complete", results={"final_loss": 1.5})
    record = json.loads((tmp_path / RUN_FILE).read_text())
    assert record["started_at"] == started and record["status"] == "complete"
    assert record["results"] == {"final_loss": 1.5} and record["identity"] == ident()


def test_output_dir_must_be_a_writable_directory(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OpenkdError, match=r"is a file"):
        check_output_dir_usable(tmp_path / "file")
    check_output_dir_usable(tmp_path / "new" / "deeper")


def card_info(**changes):
    info = dict(
        student="Qwen/Qwen2.5-0.5B-Instruct",
        dataset="/data/teacher.jsonl",
        teacher={"name": "Qwen/Qwen2.5-72B-Instruct", "revision": "main"},
        settings={"learning rate": 2e-5},
        train_rows=1000,
        eval_rows=50,
        skipped_rows=7,
        trained_tokens=123456,
        steps=125,
        final_loss=0.8123,
        eval_loss=0.9,
        lora=False,
    )
    info.update(changes)
    return CardInfo(**info)


def test_card_names_teacher_data_settings_and_loss():
    card = render_card(card_info(repo_id="org/student"))
    header = card.split("---")[1]
    assert "base_model: Qwen/Qwen2.5-0.5B-Instruct" in header  # a Hub id
    assert "datasets" not in header  # a local path is not a Hub dataset
    assert "**Qwen/Qwen2.5-72B-Instruct** (revision `main`)" in card
    assert "Training examples: 1,000, held out for evaluation: 50" in card
    assert "| learning rate | 2e-05 |" in card
    assert "Final training loss: 0.8123" in card and "Final evaluation loss: 0.9" in card
    assert 'AutoModelForCausalLM.from_pretrained("org/student")' in card


def test_card_without_teacher_metadata_and_for_an_adapter():
    card = render_card(card_info(teacher=None, lora=True, student="/models/local", eval_loss=None))
    assert "teacher **unknown**" in card and "library_name: peft" in card
    assert "base_model" not in card and "AutoPeftModelForCausalLM" in card
    assert "evaluation loss" not in card
    merged = render_card(card_info(lora=True, merged=True))
    assert "library_name: transformers" in merged


def test_log_line_is_readable_and_totals_are_skipped():
    from openkd.train.trainer import format_log

    line = format_log(
        10, 60, {"loss": 3.14159, "learning_rate": 1e-2, "grad_norm": 1.5, "epoch": 1.25}
    )
    assert line == "step 10/60  loss 3.1416  grad norm 1.5  lr 0.01  epoch 1.25"
    assert format_log(60, 60, {"train_runtime": 5.0, "train_loss": 3.0}) is None
    assert "eval loss 2.5000" in format_log(30, 60, {"eval_loss": 2.5})
