"""`openkd generate --verify`: only answers whose final answer matches the gold one are trained
on, the rest are set aside with the verdict; `--num-samples` draws several answers per prompt,
each exactly once across kills; pass rates are reported. The mock teacher is wrong on purpose
(`--mock-wrong REGEX`: on even-numbered samples of matching prompts)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from openkd.tiny import make_prompts
from openkd.tiny.tasks import sum_numbers
from tests.conftest import read_jsonl, write_jsonl
from tests.helpers import error_line, invoke


def sums(tmp_path: Path, n: int = 60) -> tuple[Path, list[str]]:
    prompts = make_prompts(n, rule="sum", seed=3)
    rows = [{"prompt": p, "answer": sum_numbers(p)} for p in prompts]
    return write_jsonl(tmp_path / "sums.jsonl", rows), prompts


def generate(dataset: Path, out: Path, *extra: str):
    return invoke(
        "generate", "--backend", "mock", "--mock-rule", "sum", "--teacher", "mock",
        "--dataset", dataset, "--output", out, "--verify", "math", *extra,
    )  # fmt: skip


def prompts_in(path: Path) -> list[str]:
    return [r["prompt"][-1]["content"] for r in read_jsonl(path)] if path.exists() else []


def test_exactly_the_wrong_answers_are_rejected_with_their_verdict(tmp_path):
    dataset, prompts = sums(tmp_path)
    wrong = {p for p in prompts if " 1" in p}
    assert 0 < len(wrong) < len(prompts)
    out = tmp_path / "t.jsonl"
    proc = generate(dataset, out, "--mock-wrong", " 1")
    assert proc.returncode == 0, proc.stderr
    rejected = read_jsonl(tmp_path / "t.rejected.jsonl")
    assert {r["prompt"][-1]["content"] for r in rejected} == wrong
    assert set(prompts_in(out)) == set(prompts) - wrong
    for row in rejected:
        verdict = row["verification"]
        assert not verdict["correct"] and verdict["method"] == "math"
        assert verdict["gold"] == sum_numbers(row["prompt"][-1]["content"])
        assert verdict["answer"] != verdict["gold"] and verdict["reason"]
    assert all(r["verification"]["correct"] for r in read_jsonl(out))
    meta = json.loads((tmp_path / "t.meta.json").read_text())
    checked = meta["verification"]
    assert checked["answers"] == 60 and checked["verified"] == 60 - len(wrong)
    assert checked["pass@1"] == pytest.approx((60 - len(wrong)) / 60, abs=1e-4)
    assert meta["counts"]["rejected"]["rows"] == len(wrong)
    card = (tmp_path / "t.README.md").read_text()
    assert f"{60 - len(wrong)} of 60 answers to 60 prompts verified" in card
    # Rejected answers count as done: a rerun asks the teacher nothing.
    again = generate(dataset, out, "--mock-wrong", " 1")
    assert again.returncode == 0 and "unchanged since the run that wrote them" in again.stderr


def test_equivalent_forms_verify_and_others_do_not(tmp_path):
    rows = [  # the echo teacher answers with the prompt itself
        {"prompt": "The answer is \\boxed{7}.", "answer": "7"},
        {"prompt": "So x = \\frac{1}{2}", "answer": "0.5"},
        {"prompt": "$\\boxed{\\frac{3}{4}}$", "answer": "\\frac{6}{8}"},
        {"prompt": "The answer is \\boxed{3}.", "answer": "4"},
    ]
    dataset = write_jsonl(tmp_path / "p.jsonl", rows)
    out = tmp_path / "t.jsonl"
    proc = invoke(
        "generate", "--backend", "mock", "--mock-rule", "echo", "--teacher", "mock",
        "--dataset", dataset, "--output", out, "--verify", "math",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert len(read_jsonl(out)) == 3
    assert prompts_in(tmp_path / "t.rejected.jsonl") == ["The answer is \\boxed{3}."]


def test_samples_pass_rates_and_first_verified(tmp_path):
    dataset, prompts = sums(tmp_path, 30)
    wrong = {p for p in prompts if " 1" in p}
    out = tmp_path / "t.jsonl"
    args = ("--num-samples", "2", "--temperature", "0.6", "--mock-wrong", " 1")
    proc = generate(dataset, out, *args)
    assert proc.returncode == 0, proc.stderr
    kept = read_jsonl(out)
    # Right prompts: both samples verify; wrong ones: only sample 1 does.
    kept_samples: dict[str, set[int]] = {}
    for row in kept:
        kept_samples.setdefault(row["prompt"][-1]["content"], set()).add(row["sample"])
    assert kept_samples == {p: ({1} if p in wrong else {0, 1}) for p in prompts}
    assert len({r["id"] for r in kept}) == len(kept)  # each sample its own id
    checked = json.loads((tmp_path / "t.meta.json").read_text())["verification"]
    assert checked["pass@2"] == 1.0
    assert checked["pass@1"] == pytest.approx(1 - len(wrong) / 60, abs=1e-4)

    first = tmp_path / "first.jsonl"
    proc = generate(dataset, first, *args, "--keep", "first-verified")
    assert proc.returncode == 0, proc.stderr
    one_each = read_jsonl(first)
    assert len(one_each) == 30 and len({r["prompt_id"] for r in one_each}) == 30
    samples = {r["prompt"][-1]["content"]: r["sample"] for r in one_each}
    assert all(samples[p] == (1 if p in wrong else 0) for p in prompts)
    superseded = [
        r for r in read_jsonl(tmp_path / "first.rejected.jsonl") if r["verification"]["correct"]
    ]
    assert len(superseded) == 30 - len(wrong)
    assert all("--keep first-verified" in r["verification"]["reason"] for r in superseded)


@pytest.mark.slow
def test_samples_survive_sigkill_exactly_once(tmp_path):
    dataset, _ = sums(tmp_path, 600)
    out = tmp_path / "t.jsonl"
    args = [
        "generate", "--backend", "mock", "--mock-rule", "sum", "--teacher", "mock",
        "--dataset", str(dataset), "--output", str(out), "--verify", "math",
        "--num-samples", "3", "--temperature", "0.6", "--mock-wrong", " 1",
        "--mock-latency", "0.01", "--concurrency", "16", "--commit-interval", "0.2",
    ]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "openkd", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    rejected = tmp_path / "t.rejected.jsonl"
    deadline = time.monotonic() + 120
    while len(prompts_in(out)) < 200 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert 200 <= len(prompts_in(out)) + len(prompts_in(rejected)) < 1800

    again = invoke(*args)
    assert again.returncode == 0, again.stderr
    rows = read_jsonl(out) + read_jsonl(rejected)
    assert len(rows) == len({r["id"] for r in rows}) == 1800
    assert {(r["prompt_id"], r["sample"]) for r in rows} == {
        (r["prompt_id"], s) for r in rows for s in range(3)
    }


@pytest.mark.parametrize(
    ("extra", "rows", "code", "message"),
    [
        (
            [],
            [{"prompt": "Add the numbers: 1 2", "gold": "3"}],
            1,
            "--answer-column 'answer' is not in --dataset",
        ),
        (
            [],
            [
                {"prompt": "Add the numbers: 1 2", "answer": "3"},
                {"prompt": "Add the numbers: 3", "answer": None},
                {"prompt": "Add the numbers: 4", "answer": " "},
            ],
            1,
            "2 selected rows of --dataset .* have no gold answer in 'answer' \\(rows 1, 2\\)",
        ),
        (
            ["--num-samples", "4"],
            [{"prompt": "Add the numbers: 1 2", "answer": "3"}],
            2,
            "--num-samples 4 draws several answers per prompt, but greedy decoding",
        ),
        (["--keep", "all"], [{"prompt": "a", "answer": "3"}], 0, None),
    ],
)
def test_bad_verification_input_is_one_line_before_the_teacher(
    tmp_path, extra, rows, code, message
):
    import re

    dataset = write_jsonl(tmp_path / "p.jsonl", rows)
    out = tmp_path / "t.jsonl"
    proc = generate(dataset, out, *extra)
    assert proc.returncode == code, proc.stderr
    if message:
        last = error_line(proc.stderr)
        assert re.search(message, last), last
        assert "teacher:" not in proc.stderr and not out.exists()
