"""`openkd decontaminate`: planted benchmark overlaps are dropped, and nothing else is."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from openkd.decontaminate.ngrams import NgramIndex, words
from tests.conftest import read_jsonl, run_cli, write_jsonl
from tests.helpers import error_line, invoke

PROBLEMS = [
    "Let $f(x) = 3x^2 + 2x - 7$. Find the sum of all real values of $x$ such that $f(x) = 0$.",
    "How many positive divisors does the number 2024 have, counting 1 and itself?",
    "What is 2+2?",  # shorter than 8 words: can never match at n = 8
]
ROWS = [
    # copied with other case, punctuation and TeX spacing: still the same 8-grams
    {"id": "recased", "prompt": "LET f(x)=3x^2+2x-7; find the SUM of all real values of x!"},
    # eight consecutive words of problem 2 inside a longer prompt
    {"id": "embedded", "prompt": "Quick one. How many positive divisors does the number 2024 own?"},
    # seven consecutive words of problem 2, then a different word: a near miss, kept
    {"id": "near-miss", "prompt": "How many positive divisors does the number 2025 have, counting"},
    {"id": "unrelated", "prompt": "Reverse the words: tiger apple stone"},
    {"id": "short", "prompt": "What is 2+2?"},
]
# Every column comes back as it was, nested ones too.
ROWS = [{**row, "meta": {"n": [i], "ok": True}} for i, row in enumerate(ROWS)]


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    bench = write_jsonl(tmp_path / "bench" / "mini.jsonl", [{"problem": p} for p in PROBLEMS])
    other = write_jsonl(
        tmp_path / "bench" / "other.jsonl", [{"question": "tiger apple stone", "choices": ["a"]}]
    )
    data = write_jsonl(tmp_path / "prompts.jsonl", ROWS)
    return {"bench": bench, "other": other, "data": data, "out": tmp_path / "out" / "clean.jsonl"}


def _run(files: dict[str, Path], *extra: str | Path):
    return invoke(
        "decontaminate", "--dataset", files["data"], "--benchmark", files["bench"],
        "--output", files["out"], *extra,
    )  # fmt: skip


def test_planted_overlaps_are_dropped_and_nothing_else(files):
    proc = _run(files)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(files["out"])
    kept = read_jsonl(files["out"])
    assert kept == [ROWS[2], ROWS[3], ROWS[4]]  # every column kept as it was, in order
    dropped = read_jsonl(files["out"].with_name("clean.contaminated.jsonl"))
    assert [d["row"] for d in dropped] == [ROWS[0], ROWS[1]]
    assert dropped[0] == {
        "benchmark": str(files["bench"]),
        "benchmark_row": 0,
        "ngram": "let f x 3x 2 2x 7 find",
        "source_index": 0,
        "row": ROWS[0],
    }
    assert dropped[1]["ngram"] == "how many positive divisors does the number 2024"
    assert dropped[1]["benchmark_row"] == 1
    # a benchmark row too short to match is warned about; the summary table has the counts
    assert "1 of 3 rows have fewer than 8 words and can never match" in proc.stderr
    assert "rows in" in proc.stderr and "dropped: " in proc.stderr


def test_metadata_beside_the_output(files):
    assert _run(files, "--ngram-size", "4").returncode == 0
    meta = json.loads(files["out"].with_name("clean.meta.json").read_text())
    assert meta["ngram_size"] == 4
    # at n = 4 the near miss and the 4-word problem match too
    assert meta["counts"] == {"rows": 5, "kept": 1, "dropped": 4, "unchecked": 0}
    (bench,) = meta["benchmarks"]
    assert bench["rows"] == 3 and bench["dropped"] == 4 and bench["short"] == 0
    assert bench["columns"] == ["problem"] and bench["ngrams"] > 0
    assert meta["config"]["benchmark"][0]["source"] == str(files["bench"])


def test_several_benchmarks_columns_and_yaml(files, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "decontaminate": {
                    "dataset": str(files["data"]),
                    "benchmark": [
                        f"{files['bench']}:problem",
                        {"source": str(files["other"]), "columns": ["question"], "name": "other"},
                    ],
                    "ngram_size": 8,
                    "output": str(files["out"]),
                }
            }
        )
    )
    proc = invoke("decontaminate", "--config", config, "--ngram-size", "3")  # the flag wins
    assert proc.returncode == 0, proc.stderr
    dropped = read_jsonl(files["out"].with_name("clean.contaminated.jsonl"))
    assert [(d["row"]["id"], d["benchmark"]) for d in dropped] == [
        ("recased", str(files["bench"])),
        ("embedded", str(files["bench"])),
        ("near-miss", str(files["bench"])),
        ("unrelated", "other"),
        ("short", str(files["bench"])),
    ]
    dry = invoke("decontaminate", "--config", config, "--dry-run")
    resolved = yaml.safe_load(dry.stdout)["decontaminate"]
    assert resolved["benchmark"][0] == {
        "source": str(files["bench"]), "columns": ["problem"], "split": None, "subset": None,
        "name": None,
    }  # fmt: skip
    assert resolved["benchmark"][1]["name"] == "other"


def test_prompt_template_is_what_gets_checked(files, tmp_path):
    data = write_jsonl(
        tmp_path / "q.jsonl",
        [{"q": "How many positive divisors", "rest": "does the number 2024 have?"}, {"q": "hi"}],
    )
    proc = invoke(
        "decontaminate", "--dataset", data, "--benchmark", files["bench"],
        "--prompt-template", "{{ q }} {{ rest | default('') }}", "--output", files["out"],
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert [r["q"] for r in read_jsonl(files["out"])] == ["hi"]


def test_rows_without_prompt_text_are_kept_and_counted(files, tmp_path):
    data = write_jsonl(tmp_path / "n.jsonl", [{"prompt": None}, {"prompt": PROBLEMS[1]}])
    proc = invoke(
        "decontaminate", "--dataset", data, "--benchmark", files["bench"], "--output", files["out"]
    )
    assert proc.returncode == 0, proc.stderr
    assert read_jsonl(files["out"]) == [{"prompt": None}]
    assert "rows without prompt text to check: 1 (the first is row 0)" in proc.stderr


ERRORS = {
    "missing dataset column": (
        ["--prompt-column", "question"],
        1,
        r"--dataset \S+prompts\.jsonl has no column 'question' \(columns are: id, prompt, meta\); "
        r"pass --prompt-column",
    ),
    "missing benchmark column": (
        ["--benchmark", "{other}:problem"],
        1,
        r"--benchmark \S+other\.jsonl has no column 'problem' \(columns are: question, "
        r"choices\); name the text columns as \S+other\.jsonl:COLUMN",
    ),
    "missing benchmark file": (
        ["--benchmark", "{tmp}/nope.jsonl"],
        1,
        r"--benchmark \S+nope\.jsonl: no such file or directory .*; check the path",
    ),
    "malformed benchmark": (
        ["--benchmark", "{tmp}/bad.jsonl"],
        1,
        r"\S+bad\.jsonl:2: not valid JSON .*; fix or delete that line",
    ),
    "unreachable hub benchmark": (
        ["--benchmark", "Nobody/no-such-benchmark:problem"],
        1,
        r"--benchmark Nobody/no-such-benchmark: could not load it from the Hub .*; check the id",
    ),
    "n below 1": (
        ["--ngram-size", "0"],
        2,
        r"--ngram-size: must be at least 1, got 0 \(Open R1 uses 8\)",
    ),
    "output not jsonl": (
        ["--output", "{tmp}/clean.json"],
        2,
        r"--output: '\S+clean\.json' must be a \.jsonl file",
    ),
    "same benchmark twice": (
        ["--benchmark", "{bench}"],
        2,
        r"--benchmark \S+mini\.jsonl is given more than once; list it once",
    ),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_input_is_one_line_with_the_fix(files, tmp_path, case):
    extra, code, message = ERRORS[case]
    (tmp_path / "bad.jsonl").write_text('{"problem": "a"}\n{"problem": \n')
    names = {"other": files["other"], "tmp": tmp_path, "bench": files["bench"]}
    proc = _run(files, *[e.format(**names) for e in extra])
    assert proc.returncode == code, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if "Generating" not in ln]
    line = error_line("\n".join(lines), only=True)  # datasets' progress lines aside
    assert re.search(message, line), line
    assert not files["out"].exists()


@pytest.mark.slow
def test_existing_output_needs_overwrite(files):
    assert _run(files).returncode == 0
    before = files["out"].read_bytes()
    proc = _run(files, "--ngram-size", "3")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: --output {files['out']} already exists; pass --overwrite to replace it, or "
        "another --output"
    )
    assert files["out"].read_bytes() == before
    assert _run(files, "--ngram-size", "3", "--overwrite").returncode == 0
    assert [r["id"] for r in read_jsonl(files["out"])] == ["unrelated"]


def test_normalisation_and_near_misses():
    assert words("LET f(x)=3x^2, 'Find' the_sum…") == [
        "let",
        "f",
        "x",
        "3x",
        "2",
        "find",
        "the",
        "sum",
    ]
    assert words("Ｆｕｌｌ-width É") == words("full width é")
    index = NgramIndex(8)
    assert index.add("one two three four five six seven eight nine", 0, 0) == 9
    assert index.first_match(["zero one two three four five six seven nine"]) is None
    hit = index.first_match(["x", "ONE two, three: four five six seven eight!"])
    assert hit is not None and hit.ngram == "one two three four five six seven eight"
    assert (hit.benchmark, hit.row) == (0, 0)


def test_a_recipe_says_openkd_run_does_not_decontaminate(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "decontaminate:\n  dataset: d.jsonl\n  benchmark: [b.jsonl]\n  output: c.jsonl\n"
        "generate:\n  teacher: t\n  backend: mock\n  dataset: c.jsonl\n  output: t.jsonl\n"
    )
    proc = run_cli("run", recipe, "--dry-run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert set(yaml.safe_load(proc.stdout)) == {"generate"}
    assert (
        f"`openkd run` does not run the decontaminate: section; run `openkd decontaminate "
        f"--config {recipe}` first" in proc.stderr.replace("\n", " ")
    )
