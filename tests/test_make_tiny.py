"""`openkd make-tiny`: every numeric option bounded with a one-line error, and a directory it did
not write (a trained student, say) never replaced."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from openkd.errors import OpenkdError
from openkd.tiny import build_tiny_model
from openkd.tiny.model import MARKER
from tests.helpers import Outcome, error_line, invoke

BAD = ["nan", "inf", "-1", "0", str(10**12)]
INTS = [
    "--hidden-size",
    "--layers",
    "--heads",
    "--kv-heads",
    "--intermediate-size",
    "--num-prompts",
]


def make_tiny(*args) -> Outcome:
    return invoke("make-tiny", *args)


def listing(path: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in path.iterdir()}


@pytest.mark.parametrize("value", BAD)
@pytest.mark.parametrize("flag", [*INTS, "--seed", "--weights-seed", "--init-std"])
def test_numeric_options_are_bounded(flag, value, tmp_path):
    # DIR is a file: a value that passes the checks ends at "is a file", before any build.
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code, stdout, err = make_tiny(blocker, flag, value)
    assert code == 2 and stdout == "" and "Traceback" not in err
    if value in ("nan", "inf") and flag != "--init-std":
        assert f"Invalid value for '{flag}'" in err  # not an integer: the parser says so
        return
    line = error_line(err)
    if flag in ("--seed", "--weights-seed") and value in ("0", str(10**12)):
        assert "is a file" in line  # any seed from 0 to 2**63 - 1 is a seed
    elif flag == "--init-std":
        expected = {"nan": "not a finite number", "inf": "not a finite number"}
        assert expected.get(value, "must be > 0 and at most 1") in line, line
    else:
        assert line.startswith(f"error: {flag} {value}: must be between"), line


def test_head_layout_and_size_limits(tmp_path):
    for args, expected in [
        (["--hidden-size", "96", "--heads", "5"], "must divide by --heads into an even head size"),
        (["--hidden-size", "6", "--heads", "2"], "must divide by --heads into an even head size"),
        (["--hidden-size", "4096", "--layers", "64"], "make-tiny builds at most 200M"),
        (["--task", "sum", "--num-prompts", "600000"], "--num-prompts 600000: must be between"),
        (["--task", "copy"], "--task copy: use reverse or sum"),
    ]:
        code, _, err = make_tiny(tmp_path / "m", *args)
        assert code == 2 and expected in error_line(err), error_line(err)
    assert not (tmp_path / "m").exists()


def test_output_paths_are_checked_before_anything_is_written(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    for args, expected in [
        ([tmp_path / "file"], "is a file; pass a directory for the model"),
        ([tmp_path / "file" / "m"], "is not writable (Not a directory)"),
        ([tmp_path / "m", "--prompts", tmp_path / "dir"], "is a directory; pass a .jsonl file"),
        ([tmp_path / "m", "--prompts", tmp_path / "file" / "p.jsonl"], "is not writable"),
        ([tmp_path / "m", "--prompts", tmp_path / "m" / "p.jsonl"], "lies inside the model"),
        ([tmp_path / "m", "--prompts", tmp_path / "file"], "--prompts"),
    ]:
        code, _, err = make_tiny(*args)
        assert code == 2 and expected in error_line(err), error_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "file"]


def test_a_directory_make_tiny_did_not_write_is_never_replaced(tiny_model, tmp_path):
    student = Path(shutil.copytree(tiny_model, tmp_path / "student"))
    (student / MARKER).unlink()
    (student / "openkd_run.json").write_text('{"status": "complete"}')
    before = listing(student)
    for flags in ([], ["--overwrite"]):
        code, _, err = make_tiny(student, *flags)
        line = error_line(err)
        assert code == 1 and "a trained student: it has openkd_run.json" in line, line
        assert f"make-tiny did not write it (no {MARKER}); choose another directory" in line
    # make-tiny's own model with someone's files added is not replaced either
    made = Path(shutil.copytree(tiny_model, tmp_path / "made"))
    (made / "checkpoint-2").mkdir()
    code, _, err = make_tiny(made, "--overwrite")
    assert code == 1 and "and also checkpoint-2 (not make-tiny's)" in error_line(err)
    assert listing(student) == before and (made / "checkpoint-2").is_dir()
    with pytest.raises(OpenkdError, match="is not empty"):
        build_tiny_model(student)


def test_a_tiny_model_is_replaced_only_with_overwrite(tiny_model, tmp_path):
    model = Path(shutil.copytree(tiny_model, tmp_path / "m"))
    before = listing(model)
    code, _, err = make_tiny(model)
    assert code == 1 and "already holds a tiny model" in error_line(err)
    assert "pass --overwrite to replace it" in error_line(err)
    assert listing(model) == before


def test_overwrite_replaces_a_tiny_model_and_its_prompts(tiny_model, tmp_path):
    model = Path(shutil.copytree(tiny_model, tmp_path / "m"))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Reverse the words: a b c"}\n')
    old = (model / "model.safetensors").read_bytes()
    code, stdout, err = make_tiny(
        model, "--overwrite", "--weights-seed", "1",
        "--prompts", prompts, "--num-prompts", "7",
    )  # fmt: skip
    assert code == 0, err[-2000:]
    assert stdout.strip() == str(model)
    flat = " ".join(err.split())
    assert f"--overwrite: replacing the tiny model make-tiny wrote in {model}" in flat
    assert f"--overwrite: replacing the toy prompts make-tiny wrote in {prompts}" in flat
    assert (model / "model.safetensors").read_bytes() != old
    marker = json.loads((model / MARKER).read_text())
    assert marker["spec"]["weights_seed"] == 1 and "model.safetensors" in marker["files"]
    assert sorted(p.name for p in model.iterdir()) == sorted([*marker["files"], MARKER])
    assert len(prompts.read_text().splitlines()) == 7
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no leftovers
