"""`openkd generate --logprobs K`: the teacher's top-K log-probabilities land in the sidecar beside
the rows, every row has them (also after a kill), and merge, push and --overwrite carry them.
The mock teacher (with a tokenizer) and the stand-in server (answering as a vLLM server does)
are the teachers here; tests/test_vllm_engines.py checks real vLLM engines.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from openkd.data.logprobs import SidecarReader
from openkd.tiny import make_prompts
from tests.conftest import read_jsonl, write_jsonl
from tests.helpers import invoke
from tests.standin_openai import StandIn


def mock_args(teacher: Path, dataset: Path, out: Path, *extra: str) -> list[str]:
    return [
        "generate", "--backend", "mock", "--teacher", teacher, "--dataset", dataset,
        "--output", out, "--logprobs", "4", *extra,
    ]  # fmt: skip


def all_rows(out: Path) -> list[dict]:
    rows = []
    for suffix in (".jsonl", ".eval.jsonl", ".truncated.jsonl"):
        path = out.with_name(out.stem + suffix)
        rows += read_jsonl(path) if path.exists() else []
    return rows


def test_every_row_has_its_tokens_and_top_k(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    dataset = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in make_prompts(40)])
    out = tmp_path / "t.jsonl"
    proc = invoke(*mock_args(tiny_model, dataset, out, "--eval-fraction", "0.2"))
    assert proc.returncode == 0, proc.stderr
    assert "top-4 log-probabilities" in proc.stderr and "bytes/token" in proc.stderr

    reader = SidecarReader(out.with_name("t.logprobs"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    rows = all_rows(out)
    assert len(rows) == 40 and reader.k == 4
    assert reader.missing(r["id"] for r in rows) == []
    for row in rows:
        soft = reader[row["id"]]
        answer = tokenizer(row["completion"][0]["content"], add_special_tokens=False)
        # The answer's tokens as the teacher produced them, then its end of turn.
        assert soft.token_ids.tolist() == [*answer["input_ids"], tokenizer.eos_token_id]
        assert soft.top_ids.shape == soft.top_logprobs.shape == (len(soft.token_ids), 4)
        assert (soft.top_ids[:, 0] == soft.token_ids).all()  # the answer is the teacher's argmax
        assert np.allclose(np.exp(soft.top_logprobs).sum(axis=1), 0.9, atol=0.01)

    meta = json.loads((tmp_path / "t.meta.json").read_text())
    assert meta["logprobs"]["k"] == 4 and meta["logprobs"]["dtype"] == "float16"
    assert meta["logprobs"]["bytes"] > 0 and meta["logprobs"]["bytes_per_token"] > 4 * 6
    card = (tmp_path / "t.README.md").read_text()
    assert "top-4 log-probabilities for every answer token (float16, in `t.logprobs/`" in card
    assert "--loss mix" in card

    other_k = invoke(
        "generate", "--backend", "mock", "--teacher", tiny_model, "--dataset", dataset,
        "--output", out, "--logprobs", "8",
    )  # fmt: skip
    assert other_k.returncode == 1
    assert "holds rows labelled with --logprobs 4 (this run: 8)" in other_k.stderr
    fresh = invoke(*mock_args(tiny_model, dataset, out, "--overwrite"))
    assert fresh.returncode == 0 and "removing the earlier output's files" in fresh.stderr
    assert len(list(out.with_name("t.logprobs").glob("part-*.arrow"))) == 1


@pytest.mark.slow
def test_sigkill_then_rerun_leaves_no_row_without_log_probabilities(tiny_model, tmp_path):
    dataset = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in make_prompts(3000)])
    out = tmp_path / "t.jsonl"
    args = mock_args(tiny_model, dataset, out, "--mock-latency", "0.002", "--concurrency", "16")
    proc = subprocess.Popen(
        [sys.executable, "-m", "openkd", *map(str, args)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while len(all_rows(out)) < 300 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    at_kill = all_rows(out)
    assert 300 <= len(at_kill) < 3000
    # Rows on disk at the kill already have their log-probabilities (committed before them).
    assert SidecarReader(out.with_name("t.logprobs")).missing(r["id"] for r in at_kill) == []

    again = invoke(*args)
    assert again.returncode == 0, again.stderr
    rows = all_rows(out)
    assert len(rows) == len({r["id"] for r in rows}) == 3000
    assert SidecarReader(out.with_name("t.logprobs")).missing(r["id"] for r in rows) == []


def test_merged_shards_and_the_hub_push_carry_the_sidecar(tiny_model, tmp_path):
    dataset = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in make_prompts(60)])
    out = tmp_path / "t.jsonl"
    for shard in ("0/2", "1/2"):
        assert invoke(*mock_args(tiny_model, dataset, out, "--shard", shard)).returncode == 0
    merged = tmp_path / "all.jsonl"
    shards = [tmp_path / "t.shard-0-of-2.jsonl", tmp_path / "t.shard-1-of-2.jsonl"]
    assert invoke("merge", *shards, "-o", merged).returncode == 0
    rows = read_jsonl(merged)
    assert len(rows) == 60
    assert SidecarReader(tmp_path / "all.logprobs").missing(r["id"] for r in rows) == []
    assert json.loads((tmp_path / "all.meta.json").read_text())["logprobs"]["k"] == 4

    with (
        mock.patch("datasets.DatasetDict.push_to_hub", autospec=True),
        mock.patch("huggingface_hub.HfApi.upload_file", autospec=True),
        mock.patch("huggingface_hub.HfApi.upload_folder", autospec=True) as folder,
    ):
        pushed = invoke(*mock_args(tiny_model, dataset, merged, "--push-to-hub", "org/soft"))
    assert pushed.returncode == 0, pushed.stderr
    assert folder.call_args.kwargs["folder_path"] == str(tmp_path / "all.logprobs")
    assert folder.call_args.kwargs["path_in_repo"] == "all.logprobs"


def test_backends_without_log_probabilities_are_refused_before_they_start(tmp_path):
    dataset = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Reverse the words: a b"}])
    out = tmp_path / "t.jsonl"
    proc = invoke(
        "generate", "--backend", "transformers", "--teacher", "x", "--dataset", dataset,
        "--output", out, "--logprobs", "5",
    )  # fmt: skip
    assert proc.returncode == 2
    assert "--logprobs: the transformers backend cannot return the teacher's" in proc.stderr
    no_tokenizer = invoke(*mock_args(Path("mock-name"), dataset, out))
    assert no_tokenizer.returncode == 2
    assert "--logprobs with the mock teacher needs token ids" in no_tokenizer.stderr
    assert not out.exists()


@pytest.fixture
def vllm_like() -> StandIn:
    """A stand-in answering with token ids and top-K log-probabilities, as vLLM serves them."""
    server = StandIn(echo=True)
    server.logprobs = lambda prompt, k: [
        {
            "token": f"token_id:{10 + i}",
            "logprob": -0.1,
            "top_logprobs": [
                {"token": f"token_id:{10 + i + j}", "logprob": -0.1 - j} for j in range(k)
            ],
        }
        for i in range(3)
    ]
    server.start()
    yield server
    server.stop()


def test_openai_backend_asks_for_token_ids_and_keeps_them(vllm_like, tmp_path):
    dataset = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in make_prompts(5)])
    out = tmp_path / "t.jsonl"
    proc = invoke(
        "generate", "--backend", "openai", "--base-url", vllm_like.base_url, "--teacher",
        "teacher", "--dataset", dataset, "--output", out, "--logprobs", "3",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    sent = vllm_like.requests[-1]
    assert sent["logprobs"] is True and sent["top_logprobs"] == 3
    assert sent["return_tokens_as_token_ids"] is True
    reader = SidecarReader(tmp_path / "t.logprobs")
    for row in read_jsonl(out):
        soft = reader[row["id"]]
        assert soft.token_ids.tolist() == [10, 11, 12]
        assert soft.top_ids[1].tolist() == [11, 12, 13]
        assert np.allclose(soft.top_logprobs[1], [-0.1, -1.1, -2.1], atol=0.01)

    vllm_like.logprobs = lambda prompt, k: [
        {"token": "hello", "logprob": -0.1, "top_logprobs": [{"token": "hello", "logprob": -0.1}]}
    ]
    other = tmp_path / "o.jsonl"
    text_tokens = invoke(
        "generate", "--backend", "openai", "--base-url", vllm_like.base_url, "--teacher",
        "teacher", "--dataset", dataset, "--output", other, "--logprobs", "1",
    )  # fmt: skip
    assert text_tokens.returncode == 1
    [failed, *_] = read_jsonl(tmp_path / "o.failed.jsonl")
    assert "not a token id; --logprobs needs a vLLM server" in failed["error"]
