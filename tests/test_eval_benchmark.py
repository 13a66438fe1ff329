"""`openkd eval` benchmark mode: gold-answer accuracy, pass@k, named benchmarks, no teacher."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from math import comb
from pathlib import Path

import pytest

from openkd.data.schema import FINISH_LENGTH, FINISH_STOP
from openkd.generate.backends.base import BackendBase, Completion, Request, Sampling
from tests.conftest import read_jsonl, run_cli, write_jsonl
from tests.helpers import error_line, invoke

# --- pass@k --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n,c,k,expected",
    [
        (4, 1, 1, 1 / 4),
        (4, 1, 2, 1 / 2),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
        (4, 2, 2, 5 / 6),  # 1 - C(2,2)/C(4,2) = 1 - 1/6
        (10, 3, 5, 11 / 12),  # 1 - C(7,5)/C(10,5) = 1 - 21/252
        (5, 0, 3, 0.0),
        (5, 3, 3, 1.0),  # fewer wrong answers than draws: a correct one is always drawn
        (1, 1, 1, 1.0),
    ],
)
def test_pass_at_k_matches_hand_computed_values(n, c, k, expected):
    from openkd.eval.metrics import pass_at_k

    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_is_stable_for_many_samples():
    from openkd.eval.metrics import pass_at_k, pass_ks

    exact = 1 - comb(1000 - 37, 500) / comb(1000, 500)  # Python integers: exact
    assert pass_at_k(1000, 37, 500) == pytest.approx(exact, rel=1e-12)
    assert pass_ks(1) == [1] and pass_ks(4) == [1, 2, 4] and pass_ks(6) == [1, 2, 4, 6]
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(2, 1, 3)


def test_model_metrics_from_graded_samples():
    from openkd.eval.scores import Graded, model_metrics

    def g(correct: bool, finish: str = FINISH_STOP, tokens: int = 10) -> Graded:
        return Graded("t", finish, tokens, correct, "x" if correct else None)

    problems = [[g(True), g(True)], [g(True), g(False, FINISH_LENGTH, 30)], [g(False)] * 2]
    out = model_metrics(problems)
    assert out["problems"] == 3 and out["samples"] == 2
    assert out["pass@1"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert out["pass@2"] == pytest.approx((1 + 1 + 0) / 3)
    assert out["stop_rate"] == pytest.approx(5 / 6)
    assert out["mean_tokens"] == pytest.approx(80 / 6)
    assert out["no_answer"] == pytest.approx(3 / 6) and out["failed"] == 0


# --- settings ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values,expected",
    [
        (
            {"benchmark": ["math500"], "num_samples": 4},
            "--num-samples 4 draws several answers per prompt, but greedy decoding",
        ),
        ({"benchmark": ["math500"], "dataset": "d.jsonl"}, "pass --dataset or --benchmark"),
        ({}, "--dataset is required (the held-out prompts), or --benchmark NAME"),
        ({"benchmark": ["mat500"]}, "no benchmark has this name (did you mean 'math500'?)"),
        ({"benchmark": ["math500", "MATH-500"]}, "--benchmark math500 is given twice"),
        ({"benchmark": ["f.jsonl:a,b,c"]}, "3 columns given"),
        ({"benchmark": ["aime24"], "mode": "agreement"}, "drop one"),
        (
            {"dataset": "d.jsonl", "mode": "agreement", "temperature": 0.6},
            "--num-samples and --temperature apply to benchmark mode",
        ),
    ],
)
def test_bad_benchmark_settings_are_config_errors(values, expected):
    from openkd.config import validate
    from openkd.errors import ConfigError
    from openkd.eval.config import EvalConfig

    with pytest.raises(ConfigError, match=re.escape(expected)):
        validate(EvalConfig, {"student": "s", "backend": "transformers", **values})


def test_num_samples_without_temperature_is_a_one_line_error(tmp_path):
    proc = invoke(
        "eval", "--student", "s", "--benchmark", "math500", "--num-samples", "4",
        "--output-dir", tmp_path / "out",
    )  # fmt: skip
    assert proc.returncode == 2
    line = error_line(proc.stderr)
    assert "--num-samples 4" in line and "--temperature 0.6" in line
    assert not (tmp_path / "out").exists()


def _cfg(tmp_path, **values):
    from openkd.eval.config import EvalConfig

    settings = {"student": "s", "backend": "transformers", "output_dir": tmp_path / "out"}
    return EvalConfig(**{**settings, **values})


def test_benchmark_mode_is_chosen_from_the_columns(tmp_path):
    from openkd.errors import ConfigError
    from openkd.eval.benchmark import benchmark_mode

    gold = write_jsonl(tmp_path / "gold.jsonl", [{"prompt": "1+1?", "answer": "2"}])
    both = write_jsonl(
        tmp_path / "both.jsonl", [{"prompt": "1+1?", "answer": "2", "completion": "2"}]
    )
    assert benchmark_mode(_cfg(tmp_path, dataset=str(gold)))
    assert not benchmark_mode(_cfg(tmp_path, dataset=str(both)))
    assert not benchmark_mode(_cfg(tmp_path, dataset=str(gold), teacher="t"))  # live teacher
    assert benchmark_mode(_cfg(tmp_path, dataset=str(both), mode="benchmark"))
    assert benchmark_mode(_cfg(tmp_path, benchmark=["math500"]))
    sampled = _cfg(tmp_path, dataset=str(both), num_samples=2, temperature=0.6)
    with pytest.raises(ConfigError, match=r"scored for agreement with them.*--mode benchmark"):
        benchmark_mode(sampled)


def test_no_gold_and_no_reference_names_both_ways(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "hi", "response": "hello"}])
    proc = invoke(
        "eval", "--student", tiny_model, "--dataset", data, "--backend", "transformers",
        "--output-dir", tmp_path / "out",
    )  # fmt: skip
    assert proc.returncode == 1
    line = error_line(proc.stderr)
    assert "no column 'completion' with the teacher's answers, nor 'answer' with gold" in line
    assert "--reference-column NAME" in line and "--answer-column NAME" in line
    assert "--teacher MODEL" in line


def test_one_column_named_by_two_options_is_read_once(tmp_path):
    """--reference-column answer while --answer-column is answer too (it used to end in a
    pyarrow 'Field "answer" exists 2 times' traceback)."""
    from openkd.eval.examples import read_examples

    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "1+1?", "answer": "2"}])
    cfg = _cfg(tmp_path, dataset=str(data), reference_column="answer")
    [example] = read_examples(cfg)
    assert example.reference == "2" and example.gold == "2"


# --- named benchmarks ----------------------------------------------------------------------


def test_named_benchmarks_resolve_to_lighteval_definitions():
    from openkd.eval.tasks import parse_spec

    def parse(spec: str):
        return parse_spec(spec, prompt_column="prompt", answer_column="answer", answer_regex=None)

    math500 = parse("math500")
    assert (math500.source, math500.split, math500.subset) == (
        "HuggingFaceH4/MATH-500",
        "test",
        None,
    )
    assert (math500.prompt_column, math500.gold_column, math500.verify) == (
        "problem",
        "answer",
        "math",
    )
    assert parse("aime24").source == "HuggingFaceH4/aime_2024" and parse("aime24").split == "train"
    assert parse("AIME25").source == "yentinglin/aime_2025"
    gpqa = parse("gpqa-diamond")
    assert (gpqa.source, gpqa.subset, gpqa.split) == ("Idavidrein/gpqa", "gpqa_diamond", "train")
    assert gpqa.verify == "exact" and gpqa.answer_regex
    assert gpqa.resolution()["as_in"].startswith("lighteval gpqa:diamond")
    copy = parse("math500=bench/m.jsonl")
    assert copy.source == "bench/m.jsonl" and copy.local_copy and copy.named is not None
    custom = parse("HuggingFaceH4/MATH-500:problem,solution:test")
    assert (custom.source, custom.prompt_column, custom.gold_column, custom.split) == (
        "HuggingFaceH4/MATH-500", "problem", "solution", "test",
    )  # fmt: skip
    assert parse("bench/x.jsonl").prompt_column == "prompt"  # --prompt-column's default


def test_named_benchmark_rows_from_a_mocked_hub(tmp_path, monkeypatch):
    """math500 and gpqa-diamond load the Hub ids and splits lighteval uses, and build its
    prompts: the MATH template around the problem; GPQA's four options shuffled, the gold
    being the letter the correct one landed on."""
    import datasets

    from openkd.data.benchmarks import MATH_TEMPLATE
    from openkd.eval.tasks import load, resolve

    calls = []
    hub = {
        ("HuggingFaceH4/MATH-500", None, "test"): [
            {"problem": "What is $1+1$?", "answer": "2", "solution": "...", "unique_id": "a"},
            {
                "problem": "Half of 1?",
                "answer": "\\frac{1}{2}",
                "solution": "...",
                "unique_id": "b",
            },
        ],
        ("Idavidrein/gpqa", "gpqa_diamond", "train"): [
            {
                "Question": f"Question {i}?",
                "Correct Answer": "right",
                "Incorrect Answer 1": "wrong one",
                "Incorrect Answer 2": "wrong two",
                "Incorrect Answer 3": "wrong three",
            }
            for i in range(8)
        ],
    }

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        return datasets.Dataset.from_list(hub[(path, name, split)])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    cfg = _cfg(tmp_path, benchmark=["math500", "gpqa-diamond"])
    math500, gpqa = (load(task, cfg) for task in resolve(cfg))
    assert calls == [
        ("HuggingFaceH4/MATH-500", None, "test"),
        ("Idavidrein/gpqa", "gpqa_diamond", "train"),
    ]
    assert [i.gold for i in math500.items] == ["2", "\\frac{1}{2}"]
    first = math500.items[0].prompt
    assert first == [{"role": "user", "content": MATH_TEMPLATE.format(problem="What is $1+1$?")}]
    assert "$\\boxed{ANSWER}$" in first[0]["content"]
    letters = set()
    for item in gpqa.items:
        text = item.prompt[0]["content"]
        assert text.startswith("Answer the following multiple choice question.")
        assert f"\n{item.gold}) right" in text
        letters.add(item.gold)
    assert len(letters) > 1  # shuffled, not always first
    again = load(resolve(cfg)[1], cfg)
    assert [i.gold for i in again.items] == [i.gold for i in gpqa.items]  # same every run


def test_offline_without_a_local_copy_is_one_line_naming_the_fix(tmp_path, tiny_model):
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = run_cli(
        "eval", "--student", tiny_model, "--benchmark", "math500", "--backend", "transformers",
        "--output-dir", tmp_path / "out", env=env,
    )  # fmt: skip
    assert proc.returncode == 1
    line = error_line(proc.stderr)
    assert "--benchmark math500: could not load HuggingFaceH4/MATH-500 (split test)" in line
    assert "the Hub is off (HF_HUB_OFFLINE=1)" in line
    assert "--benchmark math500=PATH" in line and "columns problem, answer" in line
    assert not (tmp_path / "out" / "report.json").exists()


# --- end to end, through a scripted model ------------------------------------------------

# Which samples of each problem a model answers right: problem -> samples (of 4) correct.
RIGHT = {
    "student": {
        "p0": {0, 1, 2, 3},
        "p1": {0, 1, 2, 3},
        "p2": {0, 1, 2, 3},
        "p3": set(),
        "p4": {1, 3},
    },
    "base": {"p1": {0, 1, 2, 3}},
}
# The right answer as the model writes it: plain where the gold is LaTeX and the other way.
WRITTEN = {"p0": "0.5", "p1": "7", "p2": "x^{2}", "p3": "12", "p4": "\\frac{6}{2}"}
GOLD = {"p0": "\\frac{1}{2}", "p1": "7", "p2": "x^2", "p3": "12", "p4": "3"}


class ScriptedBackend(BackendBase):
    """A stand-in model (behind `--backend transformers`): which samples it gets right is
    scripted per model directory name and problem; a wrong answer is boxed 13, and every
    answer to p3 is cut at the token limit."""

    name = "scripted"

    def __init__(self, cfg) -> None:
        super().__init__()
        self.role = "base" if Path(cfg.teacher).name == "base-model" else "student"

    def in_flight(self) -> int:
        return 8

    def stream(self, requests: Iterable[Request], sampling: Sampling) -> Iterator:
        for request in requests:
            problem = re.search(r"p\d", request.messages[-1]["content"]).group(0)
            right = request.sample in RIGHT[self.role].get(problem, set())
            value = WRITTEN[problem] if right else "13"
            text = f"Some steps.\nTherefore, the final answer is: $\\boxed{{{value}}}$."
            finish = FINISH_LENGTH if problem == "p3" else FINISH_STOP
            yield request, Completion(text=text, finish_reason=finish, completion_tokens=9)


@pytest.fixture
def scripted(monkeypatch):
    from openkd.generate import backends

    monkeypatch.setitem(backends.REGISTRY, "transformers", f"{__name__}:ScriptedBackend")


def test_student_and_base_scored_against_gold_by_hand_count(tmp_path, tiny_model, scripted):
    rows = [
        {"id": f"q{i}", "question": f"Problem p{i}.", "answer": GOLD[f"p{i}"]} for i in range(5)
    ]
    bench = write_jsonl(tmp_path / "bench" / "mine.jsonl", rows)
    base = tmp_path / "base-model"
    base.mkdir()
    out = tmp_path / "out"
    proc = invoke(
        "eval", "--student", tiny_model, "--base", base, "--backend", "transformers",
        "--benchmark", f"{bench}:question,answer", "--num-samples", 4, "--temperature", 0.7,
        "--output-dir", out,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out / "report.json")
    report = json.loads((out / "report.json").read_text())
    assert report["mode"] == "benchmark" and report["decoding"]["num_samples"] == 4
    [result] = report["benchmarks"]
    assert result["name"] == str(bench) and result["problems"] == 5
    assert result["resolution"]["prompt_column"] == "question"
    student = result["models"]["student"]["metrics"]
    # Correct samples per problem: 4, 4, 4, 0, 2 (p4 on odd samples only).
    assert student["pass@1"] == pytest.approx((1 + 1 + 1 + 0 + 0.5) / 5)
    assert student["pass@2"] == pytest.approx((1 + 1 + 1 + 0 + 5 / 6) / 5)
    assert student["pass@4"] == pytest.approx(4 / 5)
    assert student["stop_rate"] == pytest.approx(16 / 20)  # p3's four answers were cut
    base_metrics = result["models"]["base"]["metrics"]
    assert base_metrics["pass@1"] == pytest.approx(1 / 5) and base_metrics[
        "pass@4"
    ] == pytest.approx(1 / 5)
    assert result["gain"]["pass@1"] == pytest.approx(0.7 - 0.2)
    assert "teacher" not in result["models"]
    examples = read_jsonl(out / "examples.jsonl")
    assert [r["id"] for r in examples] == [f"q{i}" for i in range(5)]
    assert [r["student"]["correct"] for r in examples] == [4, 4, 4, 0, 2]
    p4 = examples[4]["student"]["samples"]
    assert [s["correct"] for s in p4] == [False, True, False, True]
    assert p4[0]["answer"] == "13" and p4[0]["reason"] == "answer differs from gold"
    table = " ".join(proc.stderr.split())
    assert "pass@1 (mean of 4 samples)" in table and "+50.0 pts" in table

    again = invoke(
        "eval", "--student", tiny_model, "--base", base, "--backend", "transformers",
        "--benchmark", f"{bench}:question,answer", "--num-samples", 4, "--temperature", 0.7,
        "--output-dir", out,
    )  # fmt: skip
    assert again.returncode == 0 and "reusing" in again.stderr
    assert "student answering" not in again.stderr


def test_local_copy_of_a_named_benchmark(tmp_path, tiny_model, scripted):
    rows = [{"problem": f"Problem p{i}.", "answer": GOLD[f"p{i}"]} for i in range(3)]
    copy = write_jsonl(tmp_path / "bench" / "math500.jsonl", rows)
    out = tmp_path / "out"
    # As a stage of `openkd run` whose recipe labels prompts decontaminated against MATH-500.
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "decontaminate:\n  dataset: raw.jsonl\n  prompt_column: problem\n"
        "  benchmark: [math500, aime24]\n  output: clean.jsonl\n"
        "generate:\n  teacher: t\n  dataset: clean.jsonl\n"
    )
    proc = invoke(
        "eval", "--student", tiny_model, "--backend", "transformers",
        "--benchmark", f"math500={copy}", "--output-dir", out,
        env={"OPENKD_RECIPE": str(recipe)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    [result] = json.loads((out / "report.json").read_text())["benchmarks"]
    assert result["decontaminated"] == "training prompts decontaminated against math500 (8-grams)"
    assert "decontaminated against math500" in " ".join(proc.stderr.split())
    assert result["name"] == "math500"
    resolution = result["resolution"]
    assert resolution["local_copy"] is True and resolution["source"] == str(copy)
    assert resolution["hub_id"] == "HuggingFaceH4/MATH-500"
    assert resolution["as_in"].startswith("lighteval math_500")
    assert result["models"]["student"]["metrics"]["pass@1"] == pytest.approx(1.0)
    prompt = read_jsonl(out / "examples.jsonl")[0]["prompt"][0]["content"]
    assert prompt.startswith("Solve the following math problem") and prompt.endswith("Problem p0.")
    assert "final-answer accuracy" in proc.stderr


@pytest.mark.slow
def test_tiny_model_end_to_end_with_base(tmp_path, tiny_model):
    """The real transformers backend on a tiny local benchmark: a random model answers, the
    report and the per-problem rows are written, student and base side by side."""
    rows = [
        {"problem": "What is 1+1?", "answer": "2"},
        {"problem": "Half of one?", "answer": "\\frac{1}{2}"},
        {"problem": "Three squared?", "answer": "9"},
    ]
    data = write_jsonl(tmp_path / "data" / "bench.jsonl", rows)
    out = tmp_path / "out"
    proc = invoke(
        "eval", "--student", tiny_model, "--base", tiny_model, "--backend", "transformers",
        "--dataset", data, "--prompt-column", "problem", "--max-new-tokens", 6,
        "--output-dir", out,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "scoring final-answer accuracy (benchmark mode)" in proc.stderr
    report = json.loads((out / "report.json").read_text())
    [result] = report["benchmarks"]
    assert set(result["models"]) == {"student", "base"}
    student = result["models"]["student"]["metrics"]
    assert student["problems"] == 3 and student["samples"] == 1
    assert student["pass@1"] == 0.0  # a random model never answers 2, 1/2 or 9
    assert 0.0 <= student["stop_rate"] <= 1.0 and 0 < student["mean_tokens"] <= 6
    assert result["gain"] == {"pass@1": 0.0}
    assert report["decoding"]["temperature"] == 0.0
    examples = read_jsonl(out / "examples.jsonl")
    assert [r["gold"] for r in examples] == ["2", "\\frac{1}{2}", "9"]
    assert all(len(r["student"]["samples"]) == 1 and "base" in r for r in examples)


def test_decontaminate_knows_the_same_names():
    from openkd.decontaminate.config import Benchmark

    bench = Benchmark.model_validate("gpqa-diamond")
    assert (bench.source, bench.subset, bench.split, bench.columns, bench.label) == (
        "Idavidrein/gpqa", "gpqa_diamond", "train", ["Question"], "gpqa-diamond",
    )  # fmt: skip
    assert Benchmark.model_validate("aime24=a.jsonl").source == "a.jsonl"
