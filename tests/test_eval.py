"""`openkd eval` end to end on tiny CPU models: agreement, likelihood, reports, cache, errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.conftest import read_jsonl, run_cli, write_jsonl
from tests.helpers import invoke, watch_model_loads

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
    proc = invoke(
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
    proc = invoke(*args)
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
    # The random teacher's whitespace-only answers are no reference: left out, and counted.
    scored = report["rows"]
    assert scored + report["rows_without_reference"] == N_PROMPTS and scored >= N_PROMPTS // 2
    assert student["nll_tokens"] >= scored * MAX_NEW
    # The report path is the only thing on stdout; the table is on stderr.
    assert proc.stdout.strip() == str(out_dir / "report.json")
    assert "exact match with teacher" in proc.stderr and "100.0 %" in proc.stderr


@pytest.mark.slow
def test_examples_file_has_every_answer_and_score(evaluated, labelled):
    _, out_dir, _ = evaluated
    rows = read_jsonl(out_dir / "examples.jsonl")
    teacher_rows = {r["id"]: r for r in read_jsonl(labelled)}
    with_text = [i for i, r in teacher_rows.items() if r["completion"][0]["content"].strip()]
    assert [r["id"] for r in rows] == with_text
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
    proc = invoke(*args)
    assert proc.returncode == 0, proc.stderr
    assert "reusing" in proc.stderr
    assert "student answering" not in proc.stderr
    assert report.stat().st_mtime_ns == mtime and report.read_text() == before
    assert proc.stdout.strip() == str(report)

    proc = invoke(*args, "--overwrite", "--no-nll", "--max-samples", 4)
    assert proc.returncode == 0, proc.stderr
    fresh = json.loads(report.read_text())
    assert fresh["rows"] + fresh["rows_without_reference"] == 4
    assert "nll" not in fresh["models"]["student"]["metrics"]


@pytest.mark.slow
def test_live_teacher_and_gold_answers(tmp_path, tiny_model):
    """--teacher answers live (the mock teacher reversing words) on a set with gold answers;
    the untrained student agrees with none of its answers."""
    from openkd.tiny import make_prompts
    from openkd.tiny.tasks import reverse_words

    prompts = make_prompts(6, seed=4)
    gold = [reverse_words(p) for p in prompts[:5]] + ["wrong"]
    data = write_jsonl(
        tmp_path / "p.jsonl",
        [{"prompt": p, "answer": g} for p, g in zip(prompts, gold, strict=True)],
    )
    proc = invoke(
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
    proc = invoke(
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
def test_bad_input_fails_before_loading_a_model(
    tmp_path, tiny_model, values, expected, monkeypatch
):
    from openkd.errors import OpenkdError
    from openkd.eval.config import EvalConfig
    from openkd.eval.run import run

    loads = watch_model_loads(monkeypatch)
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "hi", "completion": "hello"}])
    settings = {"student": str(tiny_model), "dataset": str(data), "backend": "transformers"}
    cfg = EvalConfig(**{**settings, "output_dir": tmp_path / "out", **values})
    with pytest.raises(OpenkdError, match=expected):
        run(cfg)
    assert loads == [], "a model was loaded before the bad input was found"
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
        ({"reference_column": "prompt"}, "--reference-column prompt is also the --prompt-column"),
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


# --- issue 15: hollow scores and late failures ------------------------------------------


def _run_eval(tmp_path, tiny_model, data, **values):
    from openkd.eval.config import EvalConfig
    from openkd.eval.run import run

    settings = {"student": str(tiny_model), "dataset": str(data), "backend": "transformers"}
    run(EvalConfig(**{**settings, "output_dir": tmp_path / "out", **values}))


@pytest.mark.slow
def test_rows_without_reference_or_nll_room_are_counted_not_scored(tmp_path, tiny_model):
    """A null or empty teacher answer is left out of every score, never a match; an answer
    whose prompt fills --nll-max-length is left out of the NLL; both are counted and said."""
    rows = [
        {"id": "none", "prompt": "alpha beta", "completion": None},
        {"id": "empty", "prompt": "gamma delta", "completion": [{"role": "assistant", "content": ""}]},
        {"id": "blank", "prompt": "eta theta", "completion": [{"role": "assistant", "content": " "}]},
        {"id": "ok", "prompt": "iota kappa", "completion": [{"role": "assistant", "content": "x y"}]},
        {"id": "long", "prompt": "word " * 60, "completion": [{"role": "assistant", "content": "z"}]},
    ]  # fmt: skip
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    out_dir = tmp_path / "out"
    proc = invoke(
        "eval", "--student", tiny_model, "--dataset", data, "--backend", "transformers",
        "--max-new-tokens", 4, "--nll-max-length", 40, "--output-dir", out_dir,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (
        "warning: 3 of 5 rows of " + str(data) + " have an empty or missing reference in "
        "column 'completion'; they are left out of every score"
    ) in proc.stderr
    assert (
        "warning: student: 1 of 2 teacher answers have no token within --nll-max-length 40"
        in proc.stderr
    )
    assert "(3 more without a reference, not scored)" in " ".join(proc.stderr.split())
    report = json.loads((out_dir / "report.json").read_text())
    assert report["rows"] == 2 and report["rows_without_reference"] == 3
    student = report["models"]["student"]["metrics"]
    assert student["rows"] == 2 and student["nll_skipped"] == 1
    assert student["nll_tokens"] > 0  # the short row was scored
    examples = read_jsonl(out_dir / "examples.jsonl")
    assert [r["id"] for r in examples] == ["ok", "long"]
    assert examples[1]["student"]["nll"] is None


def test_every_reference_empty_is_a_one_line_error(tmp_path, tiny_model):
    rows = [{"prompt": f"p{i}", "completion": None} for i in range(3)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    out_dir = tmp_path / "out"
    proc = invoke(
        "eval", "--student", tiny_model, "--dataset", data, "--output-dir", out_dir,
        "--backend", "transformers",
    )  # fmt: skip
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert (
        f"error: every row of --dataset {data} has an empty or missing reference in column "
        "'completion'"
    ) in lines[0]
    assert "--reference-column NAME" in lines[0] and "--teacher MODEL" in lines[0]
    assert not out_dir.exists()


def test_live_teacher_failures_are_left_out_not_matched():
    from openkd.eval.config import EvalConfig
    from openkd.eval.examples import Example
    from openkd.eval.report import Answer
    from openkd.eval.run import _live_answered

    cfg = EvalConfig(student="s", dataset="d", teacher="t", backend="transformers")
    examples = [
        Example(str(i), [{"role": "user", "content": "q"}], None, None, None) for i in range(3)
    ]
    refs = [Answer("", "error", 0, error="boom"), Answer(" ", "stop", 1), Answer("a b", "stop", 2)]
    kept, kept_refs, finishes, missing = _live_answered(
        cfg, examples, refs, ["error", "stop", "stop"]
    )
    assert [ex.id for ex in kept] == ["2"] and kept_refs == refs[2:] and finishes == ["stop"]
    assert missing == 2

    from openkd.errors import OpenkdError

    with pytest.raises(
        OpenkdError, match=r"--teacher t answered none of the 2 prompts \(first error: boom\)"
    ):
        _live_answered(cfg, examples[:2], refs[:2], ["error", "stop"])


def test_output_dir_problems_fail_before_any_model_loads(tmp_path, tiny_model):
    from openkd.errors import OpenkdError

    data = write_jsonl(tmp_path / "data" / "d.jsonl", [{"prompt": "hi", "completion": "hello"}])
    afile = tmp_path / "report"
    afile.write_text("mine")
    cases = [
        (afile, f"--output-dir {afile} is a file; pass a directory"),
        (tiny_model, f"--student {tiny_model} is also --output-dir {tiny_model}"),
        (tiny_model / "eval", f"--output-dir {tiny_model / 'eval'} lies inside --student"),
        (data.parent, f"--output-dir {data.parent} is the directory of --dataset {data}"),
    ]
    for out_dir, expected in cases:
        with pytest.raises(OpenkdError, match=re.escape(expected)):
            _run_eval(tmp_path, tiny_model, data, output_dir=out_dir)
    assert afile.read_text() == "mine"
    assert sorted(p.name for p in data.parent.iterdir()) == ["d.jsonl"]
    with pytest.raises(OpenkdError, match=re.escape(f"--base {tmp_path} is also --output-dir")):
        _run_eval(tmp_path, tiny_model, data, base=str(tmp_path), output_dir=tmp_path)


def test_bad_teacher_metadata_names_the_file_key_and_value(tmp_path, tiny_model):
    from openkd.errors import OpenkdError

    data = write_jsonl(tmp_path / "t.eval.jsonl", [{"prompt": "hi", "completion": "hello"}])
    meta = tmp_path / "t.meta.json"
    meta.write_text(json.dumps({"sampling": {"max_new_tokens": "lots", "stop": []}}))
    expected = f'{meta}: sampling.max_new_tokens is "lots", not a positive whole number'
    with pytest.raises(OpenkdError, match=re.escape(expected) + ".*--max-new-tokens"):
        _run_eval(tmp_path, tiny_model, data)
    meta.write_text(json.dumps({"sampling": {"max_new_tokens": 8, "stop": "lots"}}))
    with pytest.raises(OpenkdError, match=re.escape('sampling.stop is "lots", not a list')):
        _run_eval(tmp_path, tiny_model, data)
    assert not (tmp_path / "out").exists()


def test_nll_max_length_too_small_for_any_prompt_is_refused(tmp_path, tiny_model):
    from openkd.errors import ConfigError

    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "hi there", "completion": "hello"}])
    with pytest.raises(
        ConfigError,
        match=r"--nll-max-length 1 leaves no room for an answer token: the shortest prompt is (\d+) tokens.*pass --nll-max-length \d+ or more .*--no-nll",
    ):
        _run_eval(tmp_path, tiny_model, data, nll_max_length=1)
    assert not (tmp_path / "out").exists()


def test_eval_errors_name_only_eval_flags(tmp_path, tiny_model):
    from openkd.errors import OpenkdError

    data = write_jsonl(
        tmp_path / "d.jsonl",
        [{"question": "hi", "completion": "x"}, {"question": "yo", "completion": "y"}],
    )
    with pytest.raises(OpenkdError) as err:
        _run_eval(tmp_path, tiny_model, data)
    assert str(err.value).endswith("pass --prompt-column NAME")
    chat = write_jsonl(
        tmp_path / "c.jsonl",
        [{"prompt": [{"role": "assistant", "content": "a"}], "completion": "x"}],
    )
    with pytest.raises(
        OpenkdError, match=r"row 0 of .*c.jsonl: column 'prompt': no user message"
    ) as err:
        _run_eval(tmp_path, tiny_model, chat)
    assert "--messages-column" not in str(err.value)
