"""Reruns of `openkd generate` with changed settings: each setting continues, selects more
prompts, re-sorts the rows on disk, or refuses with one line, as `openkd.generate.rerun` says
and the README's table documents. Mock teacher, tens of rows: the whole matrix runs in seconds."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from openkd.data.layout import OutputFiles
from openkd.generate.config import GenerateConfig
from openkd.generate.rerun import POLICY
from openkd.generate.source import in_eval_split
from tests.conftest import read_jsonl, write_jsonl
from tests.helpers import error_line, invoke

ROWS = 24
TRUNCATE = "w3"  # the mock cuts these answers at the token limit (finish_reason=length)
README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture
def data(tmp_path: Path) -> Path:
    rows = [{"prompt": f"alpha w{i % 7} beta {i}", "other": f"gamma {i}"} for i in range(ROWS)]
    return write_jsonl(tmp_path / "prompts.jsonl", rows)


def generate(data: Path, out: Path, *args: str):
    return invoke(
        "generate", "--backend", "mock", "--teacher", "mock-t", "--dataset", data,
        "--output", out, "--mock-truncate", TRUNCATE, *args,
    )  # fmt: skip


def lines(path: Path) -> int:
    return len(read_jsonl(path)) if path.exists() else 0


def snapshot(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.parent.iterdir()) if p.is_file()}


def test_every_generate_setting_has_a_rerun_policy():
    assert set(POLICY) == set(GenerateConfig.model_fields), (
        "classify each new generate setting in openkd/generate/rerun.py"
    )


def test_readme_table_matches_the_policies():
    text = README.read_text(encoding="utf-8")
    section = text.split("### Reruns and changed settings", 1)[1].split("\n## ", 1)[0]
    documented: dict[str, str] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0] in {"continues", "selects", "resplits", "refuses"}:
            for flag in re.findall(r"`--([a-z0-9-]+)`", cells[1]):
                documented[flag.replace("-", "_")] = cells[0]
    assert documented == {
        name: policy
        for name, policy in POLICY.items()
        if policy != "continues" or name in documented
    }
    assert all(POLICY[name] == policy for name, policy in documented.items())


# --- suite (b): change one setting between two runs ---------------------------------------

TEMP = ("--temperature", "0.5")
# (first run's extra flags, second run's, outcome, rows on disk after: train, eval, truncated)
MATRIX = {
    "concurrency": ((), ("--concurrency", "3"), "continues", None),
    "commit-interval": ((), ("--commit-interval", "5"), "continues", None),
    "mock-latency": ((), ("--mock-latency", "0.0001"), "continues", None),
    "max-samples up": (("--max-samples", "10"), ("--max-samples", "20"), "selects", 20),
    "max-samples down": (("--max-samples", "20"), ("--max-samples", "10"), "selects", 20),
    "shuffle-seed": (
        ("--max-samples", "10", "--shuffle-seed", "1"),
        ("--max-samples", "10", "--shuffle-seed", "2"),
        "selects",
        None,  # the union of two 10-prompt selections
    ),
    "num-samples up": ((*TEMP, "--num-samples", "2"), (*TEMP, "--num-samples", "3"), "selects", 3 * ROWS),
    "num-samples down": ((*TEMP, "--num-samples", "3"), (*TEMP, "--num-samples", "2"), "refuses", None),
    "eval-fraction": ((), ("--eval-fraction", "0.4"), "resplits", None),
    "keep-truncated": ((), ("--keep-truncated",), "resplits", None),
    "system-prompt": ((), ("--system-prompt", "Be brief."), "refuses", None),
    "prompt-template": ((), ("--prompt-template", "Q: {{ prompt }}"), "refuses", None),
    "prompt-column": ((), ("--prompt-column", "other"), "refuses", None),
    "mock-rule": ((), ("--mock-rule", "echo"), "refuses", None),
    "mock-wrong": ((), ("--mock-wrong", "beta"), "refuses", None),
    "teacher": ((), ("--teacher", "another-teacher"), "refuses", None),
    "temperature": ((), TEMP, "refuses", None),
    "top-p": ((), ("--top-p", "0.5"), "refuses", None),
    "max-new-tokens": ((), ("--max-new-tokens", "64"), "refuses", None),
    "stop": ((), ("--stop", "zzz"), "refuses", None),
    "seed": ((), ("--seed", "3"), "refuses", None),
    "logprobs": ((), ("--logprobs", "3"), "refuses", None),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(MATRIX))
def test_rerun_matrix(case, data, tmp_path):
    first, second, outcome, total = MATRIX[case]
    out = tmp_path / "out" / "t.jsonl"
    files = OutputFiles(out)
    assert generate(data, out, *first).returncode == 0
    before = snapshot(out)
    rows_before = sum(lines(files.kind_path(k)) for k in ("train", "eval", "truncated"))
    proc = generate(data, out, *first, *second)
    rows_after = sum(lines(files.kind_path(k)) for k in ("train", "eval", "truncated"))
    if outcome == "refuses":
        assert proc.returncode == 1, proc.stderr
        line = error_line(proc.stderr)
        flag = "--" + case.split()[0]
        assert flag in line and "(this run:" in line, line
        assert "--overwrite" in line and "--output" in line
        assert snapshot(out) == before, "a refused rerun must not touch the output"
        return
    assert proc.returncode == 0, proc.stderr
    meta = json.loads(files.meta.read_text())
    assert meta["status"] == "complete"
    ids = [r["id"] for k in ("train", "eval", "truncated") for r in read_jsonl_if(files, k)]
    assert len(ids) == len(set(ids)), "a row is in two files"
    if outcome == "continues":
        assert rows_after == rows_before
        assert "nothing to label" in proc.stderr
    elif outcome == "selects":
        assert rows_after == (total or rows_after) and rows_after >= rows_before
        if case == "shuffle-seed":
            assert 10 < rows_after <= 20
    else:  # resplits: the rows are the same, each where this run's settings put it
        assert rows_after == rows_before == ROWS
        check_routing(files, eval_fraction=0.4 if "eval" in case else 0.0, keep="keep" in case)
        assert "re-sorted" in proc.stderr
        assert meta["config"][case.replace("-", "_")] == (0.4 if "eval" in case else True)


def read_jsonl_if(files: OutputFiles, kind: str) -> list[dict]:
    path = files.kind_path(kind)
    return read_jsonl(path) if path.exists() else []


def check_routing(files: OutputFiles, *, eval_fraction: float, keep: bool) -> None:
    for kind in ("train", "eval", "truncated"):
        for row in read_jsonl_if(files, kind):
            cut = row["finish_reason"] == "length"
            if cut and not keep:
                assert kind == "truncated", row
            else:
                want = "eval" if in_eval_split(row["id"], eval_fraction) else "train"
                assert kind == want, (kind, row)


def test_resplit_back_and_forth_keeps_every_row(data, tmp_path):
    out = tmp_path / "t.jsonl"
    files = OutputFiles(out)
    assert generate(data, out, "--eval-fraction", "0.3").returncode == 0
    ids = {r["id"] for k in ("train", "eval", "truncated") for r in read_jsonl_if(files, k)}
    for fraction, keep in ((0.0, True), (0.5, True), (0.5, False), (0.3, False)):
        flags = ["--eval-fraction", str(fraction), *(["--keep-truncated"] if keep else [])]
        proc = generate(data, out, *flags)
        assert proc.returncode == 0, proc.stderr
        check_routing(files, eval_fraction=fraction, keep=keep)
        now = [r["id"] for k in ("train", "eval", "truncated") for r in read_jsonl_if(files, k)]
        assert sorted(now) == sorted(ids)
    # The index was rebuilt from the re-sorted files: a rerun is answered from it at once.
    proc = generate(data, out, "--eval-fraction", "0.3")
    assert "settings unchanged since the run that wrote them" in proc.stderr


def test_an_interrupted_resplit_is_finished_by_the_next_run(data, tmp_path):
    """A kill after rows were appended to their new file, before they left the old one, leaves
    duplicates and the marker; the next run (whatever its settings) finishes the re-sort."""
    from openkd.generate.label import Routing
    from openkd.generate.resplit import _append_missing, resplit

    out = tmp_path / "t.jsonl"
    files = OutputFiles(out)
    assert generate(data, out).returncode == 0
    ids = sorted(r["id"] for r in read_jsonl(out) + read_jsonl(files.truncated))
    routing = Routing(eval_fraction=0.5, keep_truncated=False)
    files.resplit.touch()
    where = {rid: 1 for rid in (r["id"] for r in read_jsonl(out))}
    where |= {r["id"]: 4 for r in read_jsonl(files.truncated)}
    target = {r["id"]: routing.kind(r) for r in read_jsonl(out) + read_jsonl(files.truncated)}
    from collections import Counter

    _append_missing(files, where, target, Counter())  # ... and then the kill
    on_disk = [r["id"] for k in ("train", "eval", "truncated") for r in read_jsonl_if(files, k)]
    assert lines(files.eval) > 0 and len(on_disk) > len(set(on_disk)) == len(ids)  # duplicates
    proc = generate(data, out, "--eval-fraction", "0.5")
    assert proc.returncode == 0, proc.stderr
    assert not files.resplit.exists()
    now = sorted(r["id"] for k in ("train", "eval", "truncated") for r in read_jsonl_if(files, k))
    assert now == ids
    check_routing(files, eval_fraction=0.5, keep=False)
    assert resplit(files, routing).total() == 0  # nothing left to move


def test_output_never_overwrites_its_dataset(data, tmp_path):
    same = tmp_path / "same.jsonl"
    same.write_bytes(data.read_bytes())
    for extra in ((), ("--overwrite",)):
        proc = invoke(
            "generate", "--backend", "mock", "--teacher", "m", "--dataset", same,
            "--output", same, *extra,
        )  # fmt: skip
        assert proc.returncode == 1
        assert "would overwrite --dataset" in error_line(proc.stderr)
        assert same.read_bytes() == data.read_bytes()
    # The dataset given as one of the output's side files, a folder holding the output, a glob.
    cases = [
        (tmp_path / "t.eval.jsonl", tmp_path / "t.jsonl", "would overwrite --dataset"),
        (tmp_path / "dir", tmp_path / "dir" / "sub" / "t.jsonl", "lies inside --dataset"),
        (tmp_path / "g" / "*.jsonl", tmp_path / "g" / "t.jsonl", "matches --dataset"),
    ]
    for dataset, output, message in cases:
        if "*" in dataset.name:
            dataset.parent.mkdir()
            write_jsonl(dataset.parent / "p.jsonl", [{"prompt": "a b"}])
        elif dataset.suffix:
            dataset.write_bytes(data.read_bytes())
        else:
            dataset.mkdir()
            write_jsonl(dataset / "p.jsonl", [{"prompt": "a b"}])
        proc = invoke(
            "generate", "--backend", "mock", "--teacher", "m", "--dataset", dataset,
            "--output", output,
        )  # fmt: skip
        assert proc.returncode == 1, proc.stderr
        assert message in error_line(proc.stderr)
        assert not output.exists()


def test_every_answer_set_aside_still_writes_the_output_and_says_why(data, tmp_path):
    out = tmp_path / "t.jsonl"
    proc = generate(data, out, "--mock-truncate", ".")
    assert proc.returncode == 0, proc.stderr
    assert out.exists() and out.read_text() == ""
    assert lines(OutputFiles(out).truncated) == ROWS
    warning = next(ln for ln in proc.stderr.splitlines() if "0 rows to train on" in ln)
    assert "--max-new-tokens" in warning and "--keep-truncated" in warning
    assert str(out) in proc.stdout


def test_every_answer_rejected_says_why(tmp_path):
    data = write_jsonl(
        tmp_path / "p.jsonl", [{"prompt": f"2 + {i}", "answer": str(100 + i)} for i in range(8)]
    )
    out = tmp_path / "t.jsonl"
    proc = invoke(
        "generate", "--backend", "mock", "--mock-rule", "sum", "--teacher", "m",
        "--dataset", data, "--output", out, "--verify", "exact", "--answer-regex", r"(\d+)",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert out.exists() and out.read_text() == ""
    warning = next(ln for ln in proc.stderr.splitlines() if "0 rows to train on" in ln)
    assert "--verify" in warning and "--answer-column" in warning
    assert "extracted vs gold: '2' vs '100', '3' vs '101'" in warning
    assert "pass@1 0.0%" in proc.stderr  # a rate of zero is printed, not an empty cell


def test_a_failed_start_leaves_no_files(data, tmp_path):
    out = tmp_path / "out" / "t.jsonl"
    proc = invoke(
        "generate", "--backend", "openai", "--base-url", "http://127.0.0.1:9/v1",
        "--teacher", "m", "--dataset", data, "--output", out, "--logprobs", "5",
        "--max-retries", "0",
    )  # fmt: skip
    assert proc.returncode == 1
    assert "cannot reach" in error_line(proc.stderr)
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_overwrite_deletes_only_what_openkd_wrote(data, tmp_path):
    mine = write_jsonl(tmp_path / "mine.jsonl", [{"id": "x", "text": "my own data"}])
    proc = generate(data, mine, "--overwrite")
    assert proc.returncode == 1
    assert "openkd did not write it and will not delete it" in error_line(proc.stderr)
    assert read_jsonl(mine) == [{"id": "x", "text": "my own data"}]

    out = tmp_path / "t.jsonl"
    assert generate(data, out, "--eval-fraction", "0.3").returncode == 0
    notes = tmp_path / "t.notes.txt"  # the user's own file beside the output stays
    notes.write_text("keep me")
    proc = generate(data, out, "--overwrite")
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stderr.splitlines() if "--overwrite: removing" in ln)
    assert "t.jsonl" in line and "t.eval.jsonl" in line and "t.meta.json" in line
    assert notes.read_text() == "keep me"
    assert not OutputFiles(out).eval.exists()


@pytest.mark.slow
def test_a_stopped_run_says_how_much_of_the_selection_it_read(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"a b c {i}"} for i in range(5000)])
    out = tmp_path / "t.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "openkd", "generate", "--backend", "mock", "--teacher", "m",
         "--dataset", str(data), "--output", str(out), "--mock-latency", "0.02",
         "--concurrency", "4", "--commit-interval", "0.1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not (out.exists() and out.stat().st_size) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted; rerun the same command to resume" in err
    assert re.search(r"in the first [\d,]+ of 5,000 read before the stop", err), err
