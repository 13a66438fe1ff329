"""Resume picks the newest checkpoint that is whole, never one a crash left half-written.

The checkpoints are real: written by `transformers.Trainer` on the tiny model (full weights)
and by a PEFT LoRA run (adapter weights), then torn the ways a killed save tears them.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from openkd.errors import OpenkdError
from openkd.train.checkpoints import find_resume_checkpoint, list_checkpoints
from openkd.train.integrity import checkpoint_problems, safetensors_problem, torch_file_problem


def _trainer(
    model_dir: Path,
    out: Path,
    *,
    lora: bool = False,
    rows: int = 16,
    max_steps: int = 4,
    save_steps: int = 2,
):
    """A real Trainer on the tiny model: batch 4, a checkpoint every `save_steps`."""
    import torch
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
    )

    from openkd.tiny import make_prompts

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    texts = Dataset.from_dict({"text": make_prompts(rows)})
    data = texts.map(lambda r: tok(r["text"]), remove_columns=["text"])
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=max_steps,
        save_steps=save_steps,
        per_device_train_batch_size=4,
        use_cpu=True,
        report_to="none",
        logging_steps=100,
        disable_tqdm=True,
    )
    collator = DataCollatorForLanguageModeling(tok, mlm=False)
    return Trainer(model=model, args=args, train_dataset=data, data_collator=collator)


def _train(model_dir: Path, out: Path, *, lora: bool = False) -> Path:
    """4 steps, checkpoint-2 and checkpoint-4."""
    _trainer(model_dir, out, lora=lora).train()
    return out


@pytest.fixture(scope="module")
def full_run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(tiny_model, tmp_path_factory.mktemp("full") / "out")


@pytest.fixture(scope="module")
def lora_run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(tiny_model, tmp_path_factory.mktemp("lora") / "out", lora=True)


@pytest.fixture
def run_copy(full_run: Path, tmp_path: Path) -> Path:
    """A private copy of the finished run, to tear."""
    return Path(shutil.copytree(full_run, tmp_path / "out"))


def _truncate(name: str, keep: float = 0.5) -> Callable[[Path], None]:
    def tear(ckpt: Path) -> None:
        path = ckpt / name
        os.truncate(path, int(path.stat().st_size * keep))

    return tear


def _remove(name: str) -> Callable[[Path], None]:
    return lambda ckpt: (ckpt / name).unlink()


def _empty(ckpt: Path) -> None:
    shutil.rmtree(ckpt)
    ckpt.mkdir()


TEARS = {
    "truncated model.safetensors": (_truncate("model.safetensors"), "model.safetensors"),
    "missing trainer_state.json": (_remove("trainer_state.json"), "no trainer_state.json"),
    "empty directory": (_empty, "empty directory"),
    "truncated optimizer.pt": (_truncate("optimizer.pt", 0.9), "optimizer.pt"),
    "truncated trainer_state.json": (_truncate("trainer_state.json"), "not valid JSON"),
    "missing optimizer.pt": (_remove("optimizer.pt"), "no optimizer.pt"),
    "truncated scheduler.pt": (_truncate("scheduler.pt"), "scheduler.pt"),
    "truncated rng_state.pth": (_truncate("rng_state.pth"), "rng_state.pth"),
    "safetensors cut inside its header": (_truncate("model.safetensors", 0.0002), "truncated"),
}


def test_whole_run_resumes_from_newest(full_run: Path, capsys: pytest.CaptureFixture) -> None:
    assert [c.step for c in list_checkpoints(full_run)] == [4, 2]
    assert checkpoint_problems(full_run / "checkpoint-4", expected_step=4) == []
    assert find_resume_checkpoint(full_run, "auto") == full_run / "checkpoint-4"
    assert "resuming from" in capsys.readouterr().err


def test_resume_message_names_checkpoint_and_step(
    full_run: Path, capsys: pytest.CaptureFixture
) -> None:
    find_resume_checkpoint(full_run, "auto")
    err = " ".join(capsys.readouterr().err.split())
    assert f"resuming from {full_run / 'checkpoint-4'} at step 4 of 4" in err


def test_resume_message_gives_this_runs_length_not_the_checkpoints(
    full_run: Path, capsys: pytest.CaptureFixture
) -> None:
    """full_run stopped at --max-steps 4; a rerun asked for 10 trains to 10 and says so."""
    ckpt = full_run / "checkpoint-4"
    find_resume_checkpoint(full_run, "auto", max_steps=10)
    find_resume_checkpoint(full_run, str(ckpt), max_steps=10)
    err = " ".join(capsys.readouterr().err.split())
    assert err.count(f"resuming from {ckpt} at step 4 of 10") == 2
    assert "of 4" not in err
    # Epoch mode: the total is known only when the epochs are the checkpoint's.
    find_resume_checkpoint(full_run, "auto", epochs=3.0)
    assert "resuming from" in (err := " ".join(capsys.readouterr().err.split()))
    assert " of " not in err.split("resuming from", 1)[1]


@pytest.mark.parametrize("kind", list(TEARS))
def test_torn_newest_checkpoint_is_skipped_with_reason(
    kind: str, run_copy: Path, capsys: pytest.CaptureFixture
) -> None:
    tear, reason = TEARS[kind]
    tear(run_copy / "checkpoint-4")

    assert find_resume_checkpoint(run_copy, "auto") == run_copy / "checkpoint-2"

    err = " ".join(capsys.readouterr().err.split())
    assert f"skipping {run_copy / 'checkpoint-4'}" in err
    assert reason in err
    assert "at step 2" in err
    # Moved out of the Trainer's way (its rotation would count it), kept for inspection.
    assert "kept as checkpoint-4.torn" in err
    assert (run_copy / "checkpoint-4.torn").is_dir()
    assert not (run_copy / "checkpoint-4").exists()
    assert [c.step for c in list_checkpoints(run_copy)] == [2]


def test_step_mismatch_is_torn(run_copy: Path) -> None:
    # A checkpoint-N whose trainer_state.json belongs to another step was not finished.
    state = run_copy / "checkpoint-4" / "trainer_state.json"
    data = json.loads(state.read_text())
    data["global_step"] = 3
    state.write_text(json.dumps(data))
    assert checkpoint_problems(run_copy / "checkpoint-4", expected_step=4) == [
        "trainer_state.json says step 3, not 4"
    ]
    assert find_resume_checkpoint(run_copy, "auto") == run_copy / "checkpoint-2"


def test_all_torn_starts_fresh_loudly(run_copy: Path, capsys: pytest.CaptureFixture) -> None:
    _empty(run_copy / "checkpoint-4")
    _truncate("model.safetensors")(run_copy / "checkpoint-2")

    assert find_resume_checkpoint(run_copy, "auto") is None

    err = " ".join(capsys.readouterr().err.split())
    assert "found 2 checkpoint(s)" in err
    assert "none can be resumed" in err
    assert "starts from step 0" in err
    # The torn checkpoints are reported and moved aside, not deleted.
    assert (run_copy / "checkpoint-2.torn" / "model.safetensors").exists()
    assert (run_copy / "checkpoint-4.torn").is_dir()


def test_only_the_main_process_moves_torn_checkpoints(
    run_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _empty(run_copy / "checkpoint-4")
    monkeypatch.setenv("RANK", "1")
    assert find_resume_checkpoint(run_copy, "auto") == run_copy / "checkpoint-2"
    assert (run_copy / "checkpoint-4").is_dir()
    monkeypatch.setenv("RANK", "0")
    assert find_resume_checkpoint(run_copy, "auto") == run_copy / "checkpoint-2"
    assert (run_copy / "checkpoint-4.torn").is_dir()
    # A second torn checkpoint of the same step gets its own name.
    _empty(Path(shutil.copytree(run_copy / "checkpoint-2", run_copy / "checkpoint-4")))
    find_resume_checkpoint(run_copy, "auto")
    assert (run_copy / "checkpoint-4.torn-2").is_dir()


def test_explicit_valid_path(full_run: Path, capsys: pytest.CaptureFixture) -> None:
    ckpt = full_run / "checkpoint-2"
    assert find_resume_checkpoint(full_run, str(ckpt)) == ckpt
    assert "at step 2 of 4" in " ".join(capsys.readouterr().err.split())


def test_explicit_torn_path_is_one_line_error(run_copy: Path) -> None:
    ckpt = run_copy / "checkpoint-4"
    _truncate("optimizer.pt", 0.9)(ckpt)
    with pytest.raises(OpenkdError) as info:
        find_resume_checkpoint(run_copy, str(ckpt))
    message = str(info.value)
    assert "\n" not in message
    assert f"--resume {ckpt} is not a usable checkpoint" in message
    assert "optimizer.pt is truncated" in message
    assert "--resume auto" in message


def test_explicit_missing_path(tmp_path: Path) -> None:
    with pytest.raises(OpenkdError, match="no such checkpoint directory"):
        find_resume_checkpoint(tmp_path, str(tmp_path / "checkpoint-9"))


def test_explicit_output_dir_instead_of_checkpoint(full_run: Path, tmp_path: Path) -> None:
    with pytest.raises(OpenkdError, match="is a training output directory, not a checkpoint"):
        find_resume_checkpoint(full_run, str(full_run))
    # Also once the final student (with its own trainer_state.json) is there.
    finished = Path(shutil.copytree(full_run, tmp_path / "finished"))
    shutil.copy(finished / "checkpoint-4" / "trainer_state.json", finished)
    with pytest.raises(OpenkdError, match="is a training output directory, not a checkpoint"):
        find_resume_checkpoint(finished, str(finished))


def test_resume_no_ignores_checkpoints(full_run: Path, capsys: pytest.CaptureFixture) -> None:
    assert find_resume_checkpoint(full_run, "no") is None
    assert "ignoring 2 checkpoint(s)" in capsys.readouterr().err


def test_no_output_dir_yet(tmp_path: Path) -> None:
    assert find_resume_checkpoint(tmp_path / "new", "auto") is None


def test_stray_files_are_not_checkpoints(run_copy: Path) -> None:
    (run_copy / "checkpoint-9.tmp").mkdir()
    (run_copy / "checkpoint-10").write_text("not a directory")
    assert [c.step for c in list_checkpoints(run_copy)] == [4, 2]


def test_lora_adapter_checkpoint(lora_run: Path, tmp_path: Path) -> None:
    ckpt = lora_run / "checkpoint-4"
    assert (ckpt / "adapter_model.safetensors").is_file()
    assert not (ckpt / "model.safetensors").exists()
    assert checkpoint_problems(ckpt, expected_step=4) == []

    copy = Path(shutil.copytree(lora_run, tmp_path / "out"))
    _truncate("adapter_model.safetensors")(copy / "checkpoint-4")
    assert find_resume_checkpoint(copy, "auto") == copy / "checkpoint-2"


def test_sharded_weights_index(run_copy: Path) -> None:
    """A sharded save is checked through its index: a missing shard makes it torn."""
    from safetensors.torch import load_file, save_file

    ckpt = run_copy / "checkpoint-4"
    tensors = load_file(ckpt / "model.safetensors")
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half]}
    shards["model-00002-of-00002.safetensors"] = names[half:]
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, ckpt / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, shard))
    (ckpt / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": weight_map}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    assert checkpoint_problems(ckpt, expected_step=4) == []

    (ckpt / "model-00002-of-00002.safetensors").unlink()
    assert checkpoint_problems(ckpt, expected_step=4) == [
        "model-00002-of-00002.safetensors is missing"
    ]


def test_safetensors_with_trailing_bytes_is_corrupt(tmp_path: Path, tiny_model: Path) -> None:
    path = Path(shutil.copy(tiny_model / "model.safetensors", tmp_path / "m.safetensors"))
    assert safetensors_problem(path) is None
    with open(path, "ab") as fh:
        fh.write(b"\0" * 16)
    assert "but its header describes" in (safetensors_problem(path) or "")


def test_torch_file_checks(full_run: Path, tmp_path: Path) -> None:
    optimizer = full_run / "checkpoint-4" / "optimizer.pt"
    assert torch_file_problem(optimizer, load=True) is None

    corrupt = tmp_path / "optimizer.pt"
    data = bytearray(optimizer.read_bytes())
    # Flip a byte inside the pickle member: the zip directory is intact, the CRC is not.
    start = data.find(b"data.pkl") + len(b"data.pkl")
    data[start + 40] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    assert torch_file_problem(corrupt) is not None

    empty = tmp_path / "scheduler.pt"
    empty.write_bytes(b"")
    assert torch_file_problem(empty) == "is empty"


def test_resuming_the_last_checkpoint_trains_no_extra_step(
    tiny_model: Path, tmp_path: Path
) -> None:
    """12 rows in batches of 4 is 3 steps an epoch; 4 steps end inside the second epoch."""
    import torch
    from safetensors.torch import load_file

    out = tmp_path / "out"
    _trainer(tiny_model, out, rows=12, max_steps=4, save_steps=4).train()
    last = out / "checkpoint-4"
    saved = load_file(last / "model.safetensors")

    # What transformers does on its own: one more optimizer step, past max_steps.
    plain = _trainer(tiny_model, tmp_path / "plain", rows=12, max_steps=4, save_steps=4)
    plain.train(resume_from_checkpoint=str(last))
    assert plain.state.global_step == 5

    guarded = _trainer(tiny_model, tmp_path / "guarded", rows=12, max_steps=4, save_steps=4)
    from openkd.train.trainer import StopWhenComplete, TrainingAlreadyComplete

    guarded.add_callback(StopWhenComplete())
    with pytest.raises(TrainingAlreadyComplete) as info:
        guarded.train(resume_from_checkpoint=str(last))
    assert (info.value.step, info.value.max_steps) == (4, 4)
    assert guarded.state.global_step == 4
    # The checkpoint's weights are loaded and untouched: saving now writes the finished model.
    weights = dict(guarded.model.named_parameters())
    for name, tensor in saved.items():
        assert torch.equal(weights[name].detach(), tensor), name
