"""`openkd eval` end to end on tiny CPU models: agreement, likelihood, reports, cache, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import read_jsonl, run_cli, write_jsonl

N_PROMPTS = 24
MAX_NEW = 12


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    """The tiny model as teacher, through `openkd generate --backend transformers`.

    A random model never ends its answers, so they are kept with --keep-truncated; the eval
    below uses the same batch size, so student and teacher see identical batches.
    """
    from openkd.tiny import make_prompts

    root = tmp_path_factory.mktemp("labelled")
    prompts = write_jsonl(
        root / "prompts.jsonl", [{"prompt": p} for p in make_prompts(N_PROMPTS, seed=3)]
    )
    out = root / "teacher.jsonl"
    proc = run_cli(
        "generate",
        "--backend", "transformers",
        "--teacher", tiny_model,
        "--dataset", prompts,
        "--output", out,
        "--max-new-tokens", MAX_NEW,
        "--keep-truncated",
        "--concurrency", 16,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = read_jsonl(out)
    assert len(rows) == N_PROMPTS
    assert all(r["finish_reason"] == "length" for r in rows)
    assert all(r["completion_tokens"] == MAX_NEW for r in rows)
    return out


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_model, labelled):
    out_dir = tmp_path_factory.mktemp("eval") / "report"
    args = (
        "eval",
        "--student", tiny_model,
        "--dataset", labelled,
        "--backend", "transformers",
        "--concurrency", 16,
        "--output-dir", out_dir,
    )  # fmt: skip
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    return args, out_dir, proc


@pytest.mark.slow
def test_same_model_as_teacher_agrees_fully(evaluated):
    """Sanity: a student that is the teacher reproduces every answer."""
    _, out_dir, proc = evaluated
    report = json.loads((out_dir / "report.json").read_text())
    student = report["models"]["student"]["metrics"]
    assert student["exact_match"] == 1.0
    assert student["token_f1"] == 1.0 and student["rouge_l"] == 1.0
    assert student["length_ratio"] == pytest.approx(1.0)
    # Decoding came from the teacher's metadata: its token limit, hence its truncations.
    assert report["decoding"]["max_new_tokens"] == MAX_NEW
    assert student["stop_rate"] == 0.0
    assert report["models"]["teacher"]["metrics"]["stop_rate"] == 0.0
    # Teacher-forced likelihood of its own greedy answers: finite, over every answer token.
    assert 0 < student["nll"] < 20 and student["perplexity"] > 1
    assert student["nll_tokens"] >= N_PROMPTS * MAX_NEW
    # The report path is the only thing on stdout; the table is on stderr.
    assert proc.stdout.strip() == str(out_dir / "report.json")
    assert "exact match with teacher" in proc.stderr and "100.0 %" in proc.stderr


@pytest.mark.slow
def test_examples_file_has_every_answer_and_score(evaluated, labelled):
    _, out_dir, _ = evaluated
    rows = read_jsonl(out_dir / "examples.jsonl")
    teacher_rows = {r["id"]: r for r in read_jsonl(labelled)}
    assert len(rows) == N_PROMPTS
    for row in rows:
        assert row["teacher"]["text"] == teacher_rows[row["id"]]["completion"][0]["content"]
        assert row["student"]["text"] == row["teacher"]["text"]
        assert row["student"]["exact_match"] == 1.0
        assert row["student"]["nll"] > 0
        assert row["student"]["finish_reason"] == "length"


@pytest.mark.slow
def test_rerun_reuses_the_report_and_overwrite_recomputes(evaluated):
    args, out_dir, _ = evaluated
    report = out_dir / "report.json"
    before = report.read_text()
    mtime = report.stat().st_mtime_ns
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert "reusing" in proc.stderr
    assert "student answering" not in proc.stderr
    assert report.stat().st_mtime_ns == mtime and report.read_text() == before
    assert proc.stdout.strip() == str(report)

    proc = run_cli(*args, "--overwrite", "--no-nll", "--max-samples", 4)
    assert proc.returncode == 0, proc.stderr
    fresh = json.loads(report.read_text())
    assert fresh["rows"] == 4
    assert "nll" not in fresh["models"]["student"]["metrics"]


@pytest.mark.slow
def test_live_teacher_and_gold_answers(tmp_path, tiny_model):
    """--teacher answers live (the mock teacher reversing words) on a set with gold answers;
    the untrained student agrees with none of its answers."""
    from openkd.generate.backends.mock import reverse_words
    from openkd.tiny import make_prompts

    prompts = make_prompts(6, seed=4)
    gold = [reverse_words(p) for p in prompts[:5]] + ["wrong"]
    data = write_jsonl(
        tmp_path / "p.jsonl",
        [{"prompt": p, "answer": g} for p, g in zip(prompts, gold, strict=True)],
    )
    proc = run_cli(
        "eval",
        "--student", tiny_model,
        "--dataset", data,
        "--teacher", "mock-reverse",
        "--teacher-backend", "mock",
        "--backend", "transformers",
        "--answer-regex", "^(.+)$",
        "--max-new-tokens", 8,
        "--no-nll",
        "--output-dir", tmp_path / "out",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    teacher = report["models"]["teacher"]
    student = report["models"]["student"]["metrics"]
    assert teacher["source"] == "live"
    assert teacher["metrics"]["task_accuracy"] == pytest.approx(5 / 6)
    assert student["exact_match"] == 0.0 and student["task_accuracy"] == 0.0
    assert "final-answer accuracy" in proc.stderr
    rows = read_jsonl(tmp_path / "out" / "examples.jsonl")
    assert [r["teacher"]["text"] for r in rows] == [reverse_words(p) for p in prompts]
    assert [r["teacher"]["correct"] for r in rows] == [True] * 5 + [False]


def test_missing_reference_column_is_a_one_line_error(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "hi", "response": "hello"}])
    out_dir = tmp_path / "out"
    proc = run_cli(
        "eval", "--student", tiny_model, "--dataset", data, "--output-dir", out_dir,
        "--backend", "transformers",
    )  # fmt: skip
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert "no column 'completion'" in lines[0] and "--reference-column" in lines[0]
    assert "--teacher" in lines[0]
    assert not (out_dir / "report.json").exists()


@pytest.mark.parametrize(
    "values,expected",
    [
        ({"student": "./no/such/student"}, "--student ./no/such/student does not exist"),
        ({"base": "./no/base"}, "--base ./no/base does not exist"),
        ({"reference_column": "ref"}, "no column 'ref'"),
        ({"prompt_column": "question"}, "no column 'question'"),
    ],
)
def test_bad_input_fails_before_loading_a_model(tmp_path, tiny_model, values, expected):
    from openkd.errors import OpenkdError
    from openkd.eval.config import EvalConfig
    from openkd.eval.run import run

    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "hi", "completion": "hello"}])
    settings = {"student": str(tiny_model), "dataset": str(data), "backend": "transformers"}
    cfg = EvalConfig(**{**settings, "output_dir": tmp_path / "out", **values})
    with pytest.raises(OpenkdError, match=expected):
        run(cfg)
    assert not (tmp_path / "out" / "report.json").exists()


def test_every_eval_setting_is_a_documented_flag():
    from openkd.eval.config import EvalConfig

    proc = run_cli("eval", "--help", env={"COLUMNS": "200"})
    assert proc.returncode == 0
    for name, info in EvalConfig.model_fields.items():
        assert "--" + name.replace("_", "-") in proc.stdout, name
        assert info.description, f"{name} has no description"


@pytest.mark.parametrize(
    "values,expected",
    [
        ({"backend": "mock"}, "--backend: Input should be 'vllm', 'openai' or 'transformers'"),
        ({"answer_regex": "(unclosed"}, "--answer-regex is not a valid regex"),
        ({"backend": "openai"}, "backend openai needs --base-url URL or --serve"),
        (
            {"backend": "openai", "base_url": "http://x/v1", "teacher": "t"},
            "--base-url serves one model but student and teacher use backend openai",
        ),
    ],
)
def test_bad_settings_are_config_errors(values, expected):
    from openkd.config import validate
    from openkd.errors import ConfigError
    from openkd.eval.config import EvalConfig

    with pytest.raises(ConfigError, match=expected):
        validate(EvalConfig, {"student": "s", "dataset": "d", **values})
