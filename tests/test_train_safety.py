"""`openkd train` never destroys what the user has and never saves a NaN student: inputs that
are (or hold, or lie inside) --output-dir are refused, --overwrite removes only an earlier
openkd run's files, a diverging run stops at the first non-finite step, and a dataset with
nothing to train on says why before the student is loaded."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from openkd.errors import ConfigError, OpenkdError
from openkd.paths import refuse_input_as_output
from openkd.train.runinfo import RUN_FILE, clear_output_dir, write_run
from tests.conftest import write_jsonl
from tests.helpers import error_line, invoke
from tests.train_helpers import records


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "data" / "teacher.jsonl", records(24))


def listing(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in sorted(path.rglob("*"))}


def test_student_as_output_dir_is_refused_and_kept(tiny_model, data, tmp_path, monkeypatch):
    student = Path(shutil.copytree(tiny_model, tmp_path / "tcopy"))
    before = listing(student)
    monkeypatch.chdir(tmp_path)
    for out in ("tcopy", "./tcopy/", str(student / ".." / "tcopy")):
        code, stdout, err = invoke(
            "train", "--student", "tcopy", "--dataset", data, "--output-dir", out, "--overwrite",
        )  # fmt: skip
        line = error_line(err)
        assert code == 2 and stdout == ""
        assert "--student tcopy is also --output-dir" in line, line
        assert line.endswith("pass another --output-dir")
    assert listing(student) == before  # nothing removed or written


@pytest.mark.parametrize(
    "case,expected",
    [
        ("dataset_dir_holds_output", r"--output-dir \S+ lies inside --dataset \S+: the output"),
        ("student_holds_output", r"--output-dir \S+ lies inside --student \S+"),
        ("template_in_output", r"--chat-template \S+ lies inside --output-dir \S+, where it would"),
        ("eval_in_output_logs", r"--eval-dataset \S+ lies inside --output-dir \S+, where it would"),
    ],
)
def test_inputs_where_training_writes_are_refused(case, expected, tiny_model, data, tmp_path):
    out = tmp_path / "out"
    args = ["--student", tiny_model, "--dataset", data, "--output-dir", out]
    if case == "dataset_dir_holds_output":
        args[3], args[5] = data.parent, data.parent / "student"
    elif case == "student_holds_output":
        student = Path(shutil.copytree(tiny_model, tmp_path / "student"))
        args[1], args[5] = student, student / "finetuned"
    elif case == "template_in_output":
        out.mkdir()
        write_run(out, {"student": "s"}, status="complete")
        template = out / "chat_template.jinja"
        template.write_text((tiny_model / "chat_template.jinja").read_text())
        args += ["--chat-template", template, "--overwrite"]
    elif case == "eval_in_output_logs":
        eval_rows = write_jsonl(out / "runs" / "eval.jsonl", records(4, seed=3))
        args += ["--eval-dataset", eval_rows]
    before = listing(tmp_path)
    code, _, err = invoke("train", *args)
    line = error_line(err)
    assert code == 2 and re.search(expected, line), line
    assert "pass another --output-dir" in line
    assert listing(tmp_path) == before


def test_input_check_spares_hub_ids_and_files_the_output_never_touches(tmp_path):
    out = tmp_path / "out"
    (out / "data").mkdir(parents=True)
    (out / "data" / "rows.jsonl").write_text("{}\n")
    refuse_input_as_output(
        out,
        {"--student": "Qwen/Qwen2.5-0.5B", "--dataset": out / "data" / "rows.jsonl", "--x": None},
        output_flag="--output-dir",
        written=lambda rel: rel.parts[0] == "checkpoint-1",
    )
    with pytest.raises(ConfigError, match=r"--dataset \S+ lies inside --output-dir"):
        refuse_input_as_output(
            out, {"--dataset": out / "data" / "rows.jsonl"}, output_flag="--output-dir"
        )
    link = tmp_path / "link"
    link.symlink_to(out)
    with pytest.raises(ConfigError, match=r"--student \S+link is also --output-dir"):
        refuse_input_as_output(out, {"--student": link}, output_flag="--output-dir")


@pytest.mark.parametrize("overwrite", [True, False])
def test_a_model_openkd_did_not_write_is_never_removed(overwrite, tiny_model, data, tmp_path):
    out = Path(shutil.copytree(tiny_model, tmp_path / "someones-model"))
    before = listing(out)
    flags = ["--overwrite"] if overwrite else []
    code, _, err = invoke(
        "train", "--student", tiny_model, "--dataset", data, "--output-dir", out, *flags,
    )  # fmt: skip
    line = error_line(err)
    assert code == 1
    if overwrite:
        assert re.search(
            r"holds files openkd did not write \(chat_template.jinja, config.json", line
        )
        assert "--overwrite removes only an earlier openkd run's files" in line
    else:
        assert "already holds chat_template.jinja, config.json" in line
        assert "training would write over them" in line
    assert line.endswith("choose another --output-dir")
    assert listing(out) == before


def test_overwrite_names_what_it_removes_first_and_keeps_other_files(tmp_path, capsys):
    write_run(tmp_path, {"student": "s"}, status="complete")
    for name in ("checkpoint-2", "checkpoint-3.torn", "runs"):
        (tmp_path / name).mkdir()
    for name in ("model.safetensors", "notes.txt", "teacher.jsonl"):
        (tmp_path / name).write_text("x")
    removed = clear_output_dir(tmp_path)
    err = capsys.readouterr().err
    assert "--overwrite: removing 5 item(s) an earlier openkd run wrote" in " ".join(err.split())
    assert removed[-1] == RUN_FILE  # the mark goes last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "teacher.jsonl"]
    (tmp_path / "model.safetensors").write_text("x")  # no run record now: not openkd's
    with pytest.raises(OpenkdError, match=r"holds files openkd did not write \(model.safetensors"):
        clear_output_dir(tmp_path)
    assert (tmp_path / "model.safetensors").exists()


def test_zero_usable_rows_say_why_before_the_student_loads(tmp_path):
    student = tmp_path / "not-loaded"  # a config.json is all the cheap checks read
    student.mkdir()
    (student / "config.json").write_text("{}")
    root = tmp_path / "labels"
    cases = {
        "truncated": (
            r"0 usable rows in --dataset \S+t1.jsonl: the file is empty; 3 truncated or empty "
            r"answer\(s\) set aside in \S+t1.truncated.jsonl \(regenerate with a larger "
            r"--max-new-tokens, or with --keep-truncated"
        ),
        "rejected": r"the file is empty; 2 answer\(s\) that failed --verify set aside in \S+",
        "nothing": (
            r"the file is empty; did generate reject every answer\? see \S+t3.rejected.jsonl"
        ),
    }
    for i, (case, expected) in enumerate(cases.items(), 1):
        path = root / f"t{i}.jsonl"
        write_jsonl(path, [])
        if case == "truncated":
            write_jsonl(root / "t1.truncated.jsonl", records(3))
        elif case == "rejected":
            write_jsonl(root / "t2.rejected.jsonl", records(2))
        code, _, err = invoke(
            "train", "--student", student, "--dataset", path, "--output-dir", tmp_path / "out",
        )  # fmt: skip
        assert code == 1 and re.search(expected, error_line(err)), error_line(err)
    assert not (tmp_path / "out").exists()


def test_eval_dataset_equal_to_dataset_warns(tiny_model, data, tmp_path):
    # --max-length 8 stops the run after the data is read and before the weights load.
    code, _, err = invoke(
        "train", "--student", tiny_model, "--dataset", data, "--eval-dataset", f"{data}",
        "--output-dir", tmp_path / "out", "--max-length", "8",
    )  # fmt: skip
    assert code == 1 and "--max-length 8" in error_line(err)
    flat = " ".join(err.split())
    assert f"warning: --eval-dataset {data} is --dataset: the eval loss is then measured" in flat


def test_logprobs_file_is_named_as_a_file(tiny_model, data, tmp_path):
    sidecar = tmp_path / "teacher.logprobs"
    sidecar.write_text("not a directory")
    code, _, err = invoke(
        "train", "--student", tiny_model, "--dataset", data, "--output-dir", tmp_path / "out",
        "--loss", "soft", "--logprobs", sidecar,
    )  # fmt: skip
    assert code == 1
    assert error_line(err) == (
        f"error: --logprobs {sidecar} is a file; pass the <stem>.logprobs/ directory that "
        "`openkd generate --logprobs K` wrote (or an axolotl-kd/DistillKit set)"
    )


class _Accelerator:
    num_processes = 1
    optimizer_step_was_skipped = False


def _step(guard, loss: float, grad_norm: float | None, *, fp16: bool = False):
    import torch
    from transformers import TrainerControl, TrainerState

    state, control = TrainerState(), TrainerControl(should_save=True)
    state.global_step = 7
    guard.add_loss(torch.tensor(loss))
    guard.set_grad_norm(None if grad_norm is None else torch.tensor(grad_norm))
    guard.on_step_end(SimpleNamespace(fp16=fp16), state, control)
    return control


def test_guard_stops_at_the_first_non_finite_loss_or_gradient_norm():
    from openkd.train.guard import NonFiniteGuard

    trainer = SimpleNamespace(accelerator=_Accelerator())
    guard = NonFiniteGuard(trainer)
    control = _step(guard, 2.5, 1.0)
    assert not control.should_training_stop and control.should_save and guard.diverged is None
    control = _step(guard, 2.5, None)  # no norm known: the loss alone decides
    assert not control.should_training_stop
    control = _step(guard, 2.5, float("inf"))  # the weights are ruined by this step's update
    assert control.should_training_stop and not control.should_save
    assert guard.diverged is not None and guard.diverged.step == 7
    assert guard.diverged.describe() == "gradient norm inf (not finite)"
    assert guard.diverged.record()["grad_norm"] == "inf"  # JSON has no Infinity

    guard = NonFiniteGuard(trainer)
    control = _step(guard, float("nan"), float("nan"))
    assert control.should_training_stop and not control.should_save
    assert json.dumps(guard.diverged.record(), allow_nan=False)
    # fp16 loss scaling skips an overflowing step without touching the weights: not a divergence
    trainer.accelerator.optimizer_step_was_skipped = True
    guard = NonFiniteGuard(trainer)
    assert not _step(guard, 3.0, float("inf"), fp16=True).should_training_stop


@pytest.mark.slow
def test_diverging_run_keeps_its_finite_checkpoints_and_saves_no_student(
    tiny_model, data, tmp_path
):
    import torch
    from safetensors.torch import load_file

    out = tmp_path / "out"
    code, stdout, err = invoke(
        "train", "--student", tiny_model, "--dataset", data, "--output-dir", out,
        "--learning-rate", "1e30", "--lr-scheduler-type", "constant", "--warmup-ratio", "0",
        "--max-steps", "4", "--save-steps", "1", "--batch-size", "4",
        "--logging-steps", "10",  # the check runs every step, not only when logging
    )  # fmt: skip
    line = error_line(err)
    assert code == 1 and stdout == ""
    match = re.search(r"training diverged at step (\d): (loss|gradient norm) (nan|inf)", line)
    assert match, line
    step = int(match.group(1))
    assert "the student was not saved" in line and "lower --learning-rate" in line
    assert not (out / "model.safetensors").exists()
    saved = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert saved == list(range(1, step)), saved
    for n in saved:
        weights = load_file(out / f"checkpoint-{n}" / "model.safetensors")
        assert all(torch.isfinite(t).all() for t in weights.values())
    record = json.loads((out / RUN_FILE).read_text())
    assert record["status"] == "diverged" and record["diverged"]["step"] == step


@pytest.mark.slow
def test_every_process_stops_at_the_diverging_step(tiny_model, data, tmp_path):
    """Two DDP processes on CPU: both stop at the same step, neither saves (no hang)."""
    from tests.conftest import run_cli

    out = tmp_path / "out"
    proc = run_cli(
        "train", "--student", tiny_model, "--dataset", data, "--output-dir", out,
        "--num-processes", "2", "--learning-rate", "1e30", "--warmup-ratio", "0",
        "--max-steps", "4", "--save-steps", "1", "--batch-size", "4", "--max-length", "128",
        env={"OMP_NUM_THREADS": "1"}, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    stops = re.findall(r"error: training diverged at step (\d)", proc.stderr)
    assert len(stops) == 2 and len(set(stops)) == 1, proc.stderr[-3000:]  # one line per rank
    assert "training under `accelerate launch` failed (exit code 1)" in proc.stderr
    assert not (out / "model.safetensors").exists()
    assert json.loads((out / RUN_FILE).read_text())["status"] == "diverged"
