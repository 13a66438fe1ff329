"""Every bad input to `openkd generate` stops early with one line naming the problem and the fix."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import run_cli, write_jsonl
from tests.helpers import error_line, invoke, watch_model_loads


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


CASES = {
    "missing prompt column": (
        lambda d: write_jsonl(d / "p.jsonl", [{"question": "q", "answer": "a"}]),
        [],
        r"has no column 'prompt' \(columns are: question, answer\); pass --prompt-column",
    ),
    "empty dataset": (
        lambda d: _write(d / "p.jsonl", b"\n\n"),
        [],
        r"p\.jsonl has no rows",
    ),
    "malformed jsonl line": (
        lambda d: _write(d / "p.jsonl", b'{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "c"\n'),
        [],
        r"p\.jsonl:3: not valid JSON",
    ),
    "non-utf8 jsonl line": (
        lambda d: _write(d / "p.jsonl", b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n'),
        [],
        r"p\.jsonl:2: not valid UTF-8; re-encode the file as UTF-8",
    ),
    "template names a missing field": (
        lambda d: write_jsonl(d / "p.jsonl", [{"problem": "1+1", "level": 1}]),
        ["--prompt-template", "Solve: {{ problme }} at {{ level }}"],
        r"--prompt-template uses 'problme', which .* does not have; columns are: problem, level",
    ),
    "null prompt": (
        lambda d: write_jsonl(
            d / "p.jsonl", [{"prompt": "ok"}, {"prompt": "ok 2"}, {"prompt": None}]
        ),
        [],
        r"row 2 of .*p\.jsonl: column 'prompt' is null, not text",
    ),
    "missing dataset file": (
        lambda d: d / "nope.jsonl",
        [],
        r"--dataset .*nope\.jsonl: no such file or directory",
    ),
    "missing teacher path": (
        lambda d: write_jsonl(d / "p.jsonl", [{"prompt": "a"}]),
        ["--teacher", "./no/such/model"],
        r"--teacher \./no/such/model does not exist; pass an existing model directory or a Hub id",
    ),
    "bad mock regex": (
        lambda d: write_jsonl(d / "p.jsonl", [{"prompt": "a"}]),
        ["--mock-fail", "(unclosed"],
        r"--mock-fail '\(unclosed' is not a valid regex",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_nonzero_and_writes_nothing(tmp_path, case, monkeypatch):
    make, extra, message = CASES[case]
    monkeypatch.chdir(tmp_path)
    dataset = make(tmp_path)
    out = tmp_path / "out" / "t.jsonl"
    args = ["--backend", "mock", "--dataset", dataset, "--output", out]
    if "--teacher" not in extra:
        args += ["--teacher", "mock-teacher"]
    proc = invoke("generate", *args, *extra)
    assert proc.returncode == 1, proc.stderr
    last = error_line(proc.stderr)
    assert re.search(message, last), last
    assert "labelling" not in proc.stderr  # stopped before any teacher work
    assert not out.exists()


def test_output_in_an_unwritable_place_is_refused_before_loading(tmp_path, monkeypatch):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a directory")
    dataset = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}])
    loads = watch_model_loads(monkeypatch)
    proc = invoke(
        "generate", "--backend", "mock", "--teacher", "t", "--dataset", dataset,
        "--output", blocker / "t.jsonl",
    )  # fmt: skip
    assert proc.returncode == 1
    line = error_line(proc.stderr)
    assert "is not writable" in line and "pass another --output in a directory you can" in line
    assert loads == [], "the teacher was set up before the output was checked"
    assert blocker.read_text() == "not a directory"


def test_malformed_shard_is_a_config_error(tmp_path):
    dataset = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}])
    proc = invoke(
        "generate", "--backend", "mock", "--teacher", "t", "--dataset", dataset,
        "--output", tmp_path / "t.jsonl", "--shard", "3/2",
    )  # fmt: skip
    assert proc.returncode == 2
    assert "--shard '3/2' is malformed; use i/n with 0 <= i < n" in proc.stderr
    assert not (tmp_path / "t.jsonl").exists()


@pytest.mark.slow
def test_foreign_or_differently_made_output_is_not_appended_to(tmp_path):
    dataset = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Reverse the words: a b"}])
    foreign = write_jsonl(tmp_path / "mine.jsonl", [{"id": "x", "text": "my own data"}])
    base = ["generate", "--backend", "mock", "--dataset", dataset]
    proc = run_cli(*base, "--teacher", "t", "--output", foreign)
    assert proc.returncode == 1
    assert "already has rows but no mine.meta.json" in proc.stderr
    assert foreign.read_text() == '{"id": "x", "text": "my own data"}\n'

    out = tmp_path / "t.jsonl"
    assert invoke(*base, "--teacher", "teacher-a", "--output", out).returncode == 0
    before = out.read_bytes()
    proc = run_cli(*base, "--teacher", "teacher-b", "--output", out)
    assert proc.returncode == 1
    assert "holds rows labelled with --teacher 'teacher-a' (this run: 'teacher-b')" in proc.stderr
    assert "pass another --output" in proc.stderr and "or --overwrite" in proc.stderr
    assert out.read_bytes() == before


def test_a_second_writer_to_the_same_output_is_refused(tmp_path):
    import fcntl

    dataset = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}])
    with open(tmp_path / "t.lock", "w") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        proc = run_cli(
            "generate", "--backend", "mock", "--teacher", "t", "--dataset", dataset,
            "--output", tmp_path / "t.jsonl",
        )  # fmt: skip
    assert proc.returncode == 1
    assert "another `openkd generate` is writing" in proc.stderr
    assert not (tmp_path / "t.jsonl").exists()


@pytest.mark.slow
@pytest.mark.parametrize("switch", ["--debug", "OPENKD_TRACEBACK"])
def test_debug_switch_shows_the_traceback_behind_the_one_line_error(tmp_path, switch):
    dataset = _write(tmp_path / "p.jsonl", b'{"prompt": "a"}\n{"prompt": "b"\n')
    args = ["generate", "--backend", "mock", "--teacher", "t", "--dataset", dataset]
    args += ["--output", tmp_path / "out" / "t.jsonl"]
    plain = run_cli(*args, cwd=tmp_path)
    assert "Traceback" not in plain.stderr
    if switch == "--debug":
        shown = run_cli("--debug", *args, cwd=tmp_path)
    else:
        shown = run_cli(*args, cwd=tmp_path, env={"OPENKD_TRACEBACK": "1"})
    assert shown.returncode == plain.returncode == 1
    # The chain down to the parser's own error, then the same one line, last.
    assert "Traceback" in shown.stderr and "JSONDecodeError" in shown.stderr, shown.stderr
    assert shown.stderr.strip().splitlines()[-1] == plain.stderr.strip().splitlines()[-1]
