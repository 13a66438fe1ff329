"""`openkd generate` end to end with the mock teacher: outputs, resume, failures, filtering, provenance."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from openkd.generate.source import in_eval_split
from openkd.tiny import make_prompts
from openkd.tiny.tasks import reverse_words
from tests.conftest import read_jsonl, write_jsonl
from tests.generate_helpers import TEACHER, generate
from tests.helpers import error_line, invoke


def ids(path: Path) -> list[str]:
    return [row["id"] for row in read_jsonl(path)] if path.exists() else []


def test_output_loads_with_datasets_and_follows_the_rule(prompts_file, tmp_path):
    from datasets import load_dataset

    out = tmp_path / "out" / "teacher.jsonl"
    proc = generate(prompts_file, out, "--concurrency", "8", "--mock-latency", "0.001")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out)
    assert "labelled now" in proc.stderr and "completion tokens/s" in proc.stderr

    ds = load_dataset("json", data_files=str(out), split="train")
    assert len(ds) == 50
    assert set(ds.column_names) >= {"id", "prompt", "completion", "finish_reason", "source_index"}
    prompts = [row["prompt"] for row in read_jsonl(prompts_file)]
    for row in ds:
        user = row["prompt"][-1]["content"]
        assert user == prompts[row["source_index"]]
        assert row["completion"] == [{"role": "assistant", "content": reverse_words(user)}]
        assert row["finish_reason"] == "stop"
        assert row["completion_tokens"] == len(reverse_words(user).split())
    assert len(set(ds["id"])) == 50


def _popen_generate(dataset: Path, output: Path, *args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "openkd", "generate", "--backend", "mock", "--teacher", TEACHER]
    cmd += ["--dataset", str(dataset), "--output", str(output), *args]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _line_count(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


@pytest.mark.slow
def test_sigkill_midway_then_rerun_equals_an_uninterrupted_run(tmp_path):
    dataset = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in make_prompts(5000)])
    # Answers take 10 ms per word, 25 at a time, so they finish out of order (~8 s in all).
    args = ("--mock-latency", "0.01", "--concurrency", "25", "--commit-interval", "0.2")
    killed = tmp_path / "killed" / "t.jsonl"
    proc = _popen_generate(dataset, killed, *args)
    deadline = time.monotonic() + 120
    while _line_count(killed) < 500 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, f"run ended before it could be killed: {proc.stderr.read()}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    rows_at_kill = _line_count(killed)
    assert 500 <= rows_at_kill < 5000

    resumed = generate(dataset, killed, *args)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{rows_at_kill:,} rows already in t.jsonl are skipped" in resumed.stderr
    clean = tmp_path / "clean" / "t.jsonl"
    assert generate(dataset, clean).returncode == 0

    killed_ids = ids(killed)
    assert len(killed_ids) == 5000 and len(set(killed_ids)) == 5000
    canon = lambda p: sorted(json.dumps(r, sort_keys=True) for r in read_jsonl(p))  # noqa: E731
    assert canon(killed) == canon(clean)
    meta = json.loads(killed.with_name("t.meta.json").read_text())
    assert meta["counts"]["train"]["rows"] == 5000
    assert meta["status"] == "complete" and len(meta["runs"]) >= 1


def test_hand_torn_last_line_is_cut_and_regenerated(prompts_file, tmp_path):
    out = tmp_path / "t.jsonl"
    assert generate(prompts_file, out).returncode == 0
    full = out.read_bytes()
    lines = full.splitlines(keepends=True)
    # Drop the last 5 rows and leave half of the 6th-last as a torn write.
    torn = b"".join(lines[:-6]) + lines[-6][: len(lines[-6]) // 2]
    out.write_bytes(torn)

    proc = generate(prompts_file, out)
    assert proc.returncode == 0, proc.stderr
    assert "torn" in proc.stderr
    assert "44 rows already in t.jsonl are skipped" in proc.stderr
    assert sorted(out.read_bytes().splitlines()) == sorted(full.splitlines())


def test_failures_go_to_the_failed_file_and_a_rerun_clears_them(prompts_file, tmp_path):
    out = tmp_path / "t.jsonl"
    failed = tmp_path / "t.failed.jsonl"
    prompts = [row["prompt"] for row in read_jsonl(prompts_file)]
    expected_failures = sum("tiger" in p for p in prompts)
    assert 0 < expected_failures < 50

    proc = generate(prompts_file, out, "--mock-fail", "tiger", "--concurrency", "7")
    assert proc.returncode == 1
    error = error_line(proc.stderr)
    assert f"{expected_failures} of 50 prompts failed" in error
    assert "rerun the same command to retry them" in error
    failures = read_jsonl(failed)
    assert len(failures) == expected_failures
    assert all(
        "tiger" in f["prompt"][-1]["content"] and "--mock-fail" in f["error"] for f in failures
    )
    assert not any("tiger" in r["prompt"][-1]["content"] for r in read_jsonl(out))

    retry = generate(prompts_file, out)
    assert retry.returncode == 0, retry.stderr
    assert f"{expected_failures} earlier failures are retried" in retry.stderr
    assert not failed.exists()
    assert len(set(ids(out))) == 50


def test_truncated_and_empty_answers_are_set_aside_counted_and_not_redone(tmp_path):
    rows = [{"prompt": p} for p in make_prompts(20)]
    rows.append({"prompt": "Reverse the words: "})  # the rule answers with nothing
    rows.append({"prompt": "Reverse the words: one two three four five six"})  # > 4 words
    rows.append({"prompt": "Reverse the words: cut me please"})  # --mock-truncate
    dataset = write_jsonl(tmp_path / "p.jsonl", rows)
    out = tmp_path / "t.jsonl"
    args = ("--max-new-tokens", "5", "--mock-truncate", "cut me")
    proc = generate(dataset, out, *args)
    assert proc.returncode == 0, proc.stderr

    aside = read_jsonl(tmp_path / "t.truncated.jsonl")
    reasons = {
        r["prompt"][-1]["content"]: (r["finish_reason"], r["completion"][0]["content"])
        for r in aside
    }
    assert reasons["Reverse the words: "] == ("stop", "")
    assert reasons["Reverse the words: one two three four five six"] == (
        "length",
        "six five four three two",
    )
    assert reasons["Reverse the words: cut me please"] == ("length", "please")
    kept = read_jsonl(out)
    assert all(r["finish_reason"] == "stop" and r["completion"][0]["content"] for r in kept)
    assert len(kept) + len(aside) == 23
    meta = json.loads((tmp_path / "t.meta.json").read_text())
    assert meta["counts"]["truncated"]["rows"] == len(aside)
    assert meta["counts"]["train"]["rows"] == len(kept)

    again = generate(dataset, out, *args)
    assert again.returncode == 0 and "nothing to label" in again.stderr

    keep = tmp_path / "keep.jsonl"
    assert generate(dataset, keep, *args, "--keep-truncated").returncode == 0
    assert len(read_jsonl(keep)) == 23
    assert not (tmp_path / "keep.truncated.jsonl").exists()


def test_eval_fraction_holds_out_a_deterministic_share(tmp_path):
    dataset = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in make_prompts(200)])
    out = tmp_path / "t.jsonl"
    assert generate(dataset, out, "--eval-fraction", "0.25").returncode == 0
    train, held = ids(out), ids(tmp_path / "t.eval.jsonl")
    assert len(train) + len(held) == 200 and not set(train) & set(held)
    assert 25 <= len(held) <= 75
    assert all(in_eval_split(i, 0.25) for i in held)
    assert not any(in_eval_split(i, 0.25) for i in train)


def test_repeated_prompts_are_labelled_once_and_max_samples_shuffle_select(tmp_path):
    prompts = make_prompts(30)
    dataset = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in prompts + prompts[:10]])
    out = tmp_path / "t.jsonl"
    proc = generate(dataset, out)
    assert proc.returncode == 0
    assert re.search(r"repeated prompts \(labelled once\)\s*│\s*10 ", proc.stderr)
    rows = read_jsonl(out)
    assert len(rows) == 30 and {r["source_index"] for r in rows} == set(range(30))

    unique = write_jsonl(tmp_path / "u.jsonl", [{"prompt": p} for p in prompts])
    sample = tmp_path / "s.jsonl"
    args = ("--max-samples", "8", "--shuffle-seed", "3")
    assert generate(unique, sample, *args).returncode == 0
    first = [r["source_index"] for r in read_jsonl(sample)]
    again = tmp_path / "s2.jsonl"
    assert generate(unique, again, *args).returncode == 0
    assert [r["source_index"] for r in read_jsonl(again)] == first
    assert len(first) == 8 and first != sorted(first)


def test_metadata_and_card_record_provenance_and_no_secret(prompts_file, tmp_path):
    out_dir = tmp_path / "out"
    config = tmp_path / "cfg.yaml"
    config.write_text(
        "generate:\n  llm_kwargs:\n    api_key: sk-yaml-secret\n    hf_token: hf_yaml_secret\n"
        "  serve_args: ['--api-key', 'sk-serve-secret']\n"
        "  base_url: http://user:pw-url-secret@localhost:1/v1\n"
    )
    env = {"OPENAI_API_KEY": "sk-secret", "HF_TOKEN": "hf_env_secret"}
    proc = generate(
        prompts_file,
        out_dir / "t.jsonl",
        "--config",
        str(config),
        "--eval-fraction",
        "0.2",
        env=env,
    )
    assert proc.returncode == 0, proc.stderr

    meta = json.loads((out_dir / "t.meta.json").read_text())
    assert meta["teacher"] == {"name": TEACHER, "revision": None, "backend": "mock"}
    assert meta["sampling"]["temperature"] == 0.0 and meta["sampling"]["max_new_tokens"] == 4096
    rows = len(read_jsonl(out_dir / "t.jsonl"))
    assert meta["counts"]["train"]["rows"] == rows
    assert meta["counts"]["eval"]["rows"] == 50 - rows
    assert meta["tokens"]["completion_tokens"] > 0
    assert meta["versions"]["openkd"] and meta["versions"]["datasets"]
    assert meta["config"]["api_key_env"] == "OPENAI_API_KEY"  # the name, never the value
    assert meta["runs"][-1]["labelled"] == 50 and meta["status"] == "complete"

    card = (out_dir / "t.README.md").read_text()
    assert TEACHER in card and "greedy" in card and '"temperature": 0.0' in card
    assert f"| train | {rows} |" in card

    for path in out_dir.iterdir():
        text = path.read_bytes().decode("utf-8", errors="replace")  # <stem>.ids is binary
        for secret in (
            "sk-secret",
            "hf_env_secret",
            "sk-yaml-secret",
            "hf_yaml_secret",
            "sk-serve-secret",
            "pw-url-secret",
        ):
            assert secret not in text, f"{secret} leaked into {path.name}"


def test_overwrite_starts_fresh_and_a_changed_setting_is_refused(prompts_file, tmp_path):
    out = tmp_path / "t.jsonl"
    assert generate(prompts_file, out, "--mock-fail", "tiger").returncode == 1
    assert (tmp_path / "t.failed.jsonl").exists()

    refused = generate(prompts_file, out, "--max-new-tokens", "3")
    assert refused.returncode == 1
    assert "holds rows labelled with --max-new-tokens 4096 (this run: 3)" in refused.stderr
    assert "--overwrite" in refused.stderr

    fresh = generate(prompts_file, out, "--max-new-tokens", "3", "--overwrite")
    assert fresh.returncode == 0, fresh.stderr
    assert not (tmp_path / "t.failed.jsonl").exists()
    meta = json.loads((tmp_path / "t.meta.json").read_text())
    assert meta["sampling"]["max_new_tokens"] == 3 and len(meta["runs"]) == 1


def test_temperature_above_zero_warns_and_is_recorded(prompts_file, tmp_path):
    out = tmp_path / "t.jsonl"
    proc = generate(prompts_file, out, "--temperature", "0.7", "--max-samples", "5")
    assert proc.returncode == 0
    assert "warning:" in proc.stderr and "not greedy" in proc.stderr
    assert json.loads((tmp_path / "t.meta.json").read_text())["sampling"]["temperature"] == 0.7


def test_mock_counts_tokens_with_a_local_teacher_tokenizer(prompts_file, tmp_path, tiny_model):
    from transformers import AutoTokenizer

    out = tmp_path / "t.jsonl"
    proc = invoke(
        "generate",
        "--backend",
        "mock",
        "--teacher",
        tiny_model,
        "--dataset",
        prompts_file,
        "--output",
        out,
        "--max-new-tokens",
        "4",
    )
    assert proc.returncode == 0, proc.stderr
    tok = AutoTokenizer.from_pretrained(tiny_model)
    rows = read_jsonl(out) + read_jsonl(tmp_path / "t.truncated.jsonl")
    assert len(rows) == 50
    for row in rows:
        answer = row["completion"][0]["content"]
        n = len(tok(answer, add_special_tokens=False)["input_ids"])
        assert row["completion_tokens"] == n <= 4
        full = reverse_words(row["prompt"][-1]["content"])
        assert row["finish_reason"] == ("length" if answer != full else "stop")
    assert any(r["finish_reason"] == "length" for r in rows)


def test_messages_column_and_system_prompt_reach_the_record(tmp_path):
    column = "messages"
    chats = [
        [{"role": "user", "content": p}, {"role": "assistant", "content": "old"}]
        for p in make_prompts(5)
    ]
    dataset = write_jsonl(tmp_path / "p.jsonl", [{column: c} for c in chats])
    out = tmp_path / "t.jsonl"
    proc = generate(dataset, out, "--messages-column", column, "--system-prompt", "Reverse it.")
    assert proc.returncode == 0, proc.stderr
    for row in read_jsonl(out):
        assert row["prompt"][0] == {"role": "system", "content": "Reverse it."}
        assert row["prompt"][1]["role"] == "user" and len(row["prompt"]) == 2
        assert row["completion"][0]["content"] == reverse_words(row["prompt"][1]["content"])


def test_rerun_of_a_finished_run_skips_the_dataset_until_something_changes(tmp_path):
    prompts = make_prompts(40)
    dataset = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in prompts[:30]])
    out = tmp_path / "t.jsonl"
    assert generate(dataset, out, "--eval-fraction", "0.2").returncode == 0
    again = generate(dataset, out, "--eval-fraction", "0.2")
    assert again.returncode == 0, again.stderr
    assert "30 prompts selected; 30 rows already in t.jsonl are skipped" in again.stderr
    assert "dataset files and settings unchanged since the run" in again.stderr
    meta = json.loads((tmp_path / "t.meta.json").read_text())
    assert [r["status"] for r in meta["runs"]] == ["complete", "complete"]
    assert meta["runs"][-1]["already_done"] == 30 and meta["runs"][-1]["labelled"] == 0

    # Other settings, or a changed dataset, are read again: nothing is skipped on trust.
    fewer = generate(dataset, out, "--eval-fraction", "0.2", "--max-samples", "10")
    assert fewer.returncode == 0, fewer.stderr
    assert "unchanged since the run" not in fewer.stderr
    assert "nothing to label: every selected prompt is in t.jsonl" in fewer.stderr
    write_jsonl(dataset, [{"prompt": p} for p in prompts])  # 10 new prompts appended
    more = generate(dataset, out, "--eval-fraction", "0.2")
    assert more.returncode == 0, more.stderr
    assert re.search(r"labelled now\s*│\s*10 ", more.stderr)
    assert len(ids(out)) + len(ids(tmp_path / "t.eval.jsonl")) == 40

    # An output edited since (a row removed) is noticed too, and the row relabelled.
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[1:]))
    fixed = generate(dataset, out, "--eval-fraction", "0.2")
    assert re.search(r"labelled now\s*│\s*1 ", fixed.stderr), fixed.stderr
