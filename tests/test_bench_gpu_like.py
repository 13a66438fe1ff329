"""The GPU-like engine stand-in (bench/engines/gpu_like.py) and the sliding-window baseline: what
the generate_streaming benchmark relies on. Answer lengths are fixed per prompt and follow the
configured distribution, max_tokens cuts with finish_reason "length", no more than `slots`
requests decode at once, /stats adds up, and the server listens on 127.0.0.1 only. Step counts
are checked, never wall time.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from bench import proc
from bench.engines.gpu_like import Engine, Lengths

ROOT = Path(__file__).resolve().parents[1]
MODEL = "teacher"


class Server:
    def __init__(self, process: subprocess.Popen, port: int) -> None:
        self.process = process
        self.root = f"http://127.0.0.1:{port}"

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.root + path, timeout=30)

    def post(self, path: str, body: dict | None = None) -> httpx.Response:
        return httpx.post(self.root + path, json=body, timeout=30)

    def chat(self, prompt: str, **fields) -> dict:
        body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], **fields}
        response = self.post("/v1/chat/completions", body)
        assert response.status_code == 200, response.text
        return response.json()

    def chat_all(self, bodies: list[dict]) -> list[dict]:
        """Every request in flight at once."""

        import aiohttp

        async def one(session: aiohttp.ClientSession, body: dict) -> dict:
            async with session.post(f"{self.root}/v1/chat/completions", json=body) as response:
                assert response.status == 200, await response.text()
                return await response.json()

        async def send() -> list[dict]:
            connector = aiohttp.TCPConnector(limit=0)
            async with aiohttp.ClientSession(connector=connector) as session:
                return await asyncio.gather(*(one(session, b) for b in bodies))

        return asyncio.run(send())


@pytest.fixture
def start(tmp_path: Path) -> Iterator:
    """start(*flags) -> a running stand-in on a free port; stopped after the test."""
    started: list[subprocess.Popen] = []

    def launch(*flags: str) -> Server:
        log = tmp_path / f"server-{len(started)}.log"
        cmd = [sys.executable, "-m", "bench.engines.gpu_like", "--port", "0", "--model", MODEL]
        with open(log, "wb") as err:
            process = subprocess.Popen(
                [*cmd, *flags],
                stdout=subprocess.PIPE,
                stderr=err,
                stdin=subprocess.DEVNULL,
                cwd=ROOT,
                text=True,
                start_new_session=True,
            )
        started.append(process)
        first = process.stdout.readline()  # "" if it exits first
        assert first.startswith("listening on http://127.0.0.1:"), first + log.read_text()
        return Server(process, int(first.rsplit(":", 1)[1]))

    yield launch
    for process in started:
        proc.stop_group(process, grace=5)
        process.stdout.close()


def body(prompt: str, **fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": prompt}], **fields}


def test_lengths_follow_the_configured_distribution():
    prompts = [f"prompt number {i}" for i in range(4000)]
    lognormal = Lengths("lognormal", median=60, sigma=1.1, cap=1000)
    lengths = [lognormal(p) for p in prompts]
    assert lengths == [lognormal(p) for p in prompts]  # a function of the prompt
    assert min(lengths) >= 1 and max(lengths) == 1000  # capped (about 0.5 % would be longer)
    q1, median, q3 = statistics.quantiles(lengths, n=4)
    assert median == pytest.approx(60, rel=0.1)
    # Quartiles of a lognormal: median * exp(-/+ 0.674 sigma) = 28.6 and 126.
    assert q1 == pytest.approx(28.6, rel=0.1) and q3 == pytest.approx(126, rel=0.1)
    other_seed = Lengths("lognormal", median=60, sigma=1.1, cap=1000, seed=1)
    assert sum(other_seed(p) != n for p, n in zip(prompts, lengths, strict=True)) > 3000
    uniform = Lengths("uniform", uniform_tokens=60)
    assert {uniform(p) for p in prompts} == {60}


def test_engine_admits_at_most_slots_and_counts_busy_slot_steps():
    async def scenario() -> tuple[list[dict], dict]:
        engine = Engine(slots=2, step_seconds=1.0, clock=lambda: 0.0)
        futures = [engine.submit(3) for _ in range(4)] + [engine.submit(1)]
        steps = 0
        while not all(f.done() for f in futures):
            engine.advance()
            steps += 1
            assert engine.running <= 2 and steps < 100
        return [f.result() for f in futures], engine.stats()

    done, stats = asyncio.run(scenario())
    assert [(d["start_step"], d["finish_step"]) for d in done] == [
        (0, 3),
        (0, 3),
        (3, 6),
        (3, 6),
        (6, 7),  # FIFO: the short request waited its turn
    ]
    assert stats["busy_slot_steps"] == 13 and stats["completion_tokens"] == 13
    assert stats["window_steps"] == 7 and stats["max_running"] == 2
    assert stats["occupancy"] == pytest.approx(13 / (2 * 7))


def test_answers_have_the_prompts_length_and_the_fields_clients_read(start):
    server = start("--slots", "512", "--step-ms", "1", "--lengths", "lognormal", "--seed", "3")
    expected = Lengths("lognormal", median=60, sigma=1.1, cap=1000, seed=3)
    prompts = [f"Reverse the words: word{i} other{i * 7}" for i in range(300)]
    answers = server.chat_all([body(p, max_tokens=1000) for p in prompts])
    lengths = [a["usage"]["completion_tokens"] for a in answers]
    assert lengths == [expected(p) for p in prompts]
    assert statistics.median(lengths) == pytest.approx(60, rel=0.25)
    first = answers[0]
    assert first["model"] == MODEL and first["object"] == "chat.completion"
    assert first["id"].startswith("chatcmpl-") and first["system_fingerprint"]
    assert {a["choices"][0]["finish_reason"] for a in answers} == {"stop"}
    assert all(
        a["choices"][0]["message"]["content"].split() == ["tok"] * n
        for a, n in zip(answers, lengths, strict=True)
    )
    usage = first["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0

    # The same prompt with a system message, through the OpenAI client: the same length.
    from openai import OpenAI

    client = OpenAI(base_url=server.root + "/v1", api_key="EMPTY", max_retries=0)
    response = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": prompts[0]},
        ],
        temperature=0.0,
        max_tokens=1000,
        seed=0,
    )
    assert response.usage.completion_tokens == lengths[0]
    assert response.choices[0].finish_reason == "stop"
    client.close()


def test_max_tokens_cuts_the_answer_with_finish_reason_length(start):
    server = start("--step-ms", "1", "--lengths", "uniform", "--uniform-tokens", "12")
    cut = server.chat("a prompt", max_tokens=5)
    assert cut["choices"][0]["finish_reason"] == "length"
    assert cut["usage"]["completion_tokens"] == 5
    assert cut["choices"][0]["message"]["content"] == "tok tok tok tok tok"
    whole = server.chat("a prompt", max_tokens=12)
    assert whole["choices"][0]["finish_reason"] == "stop"
    assert whole["usage"]["completion_tokens"] == 12
    assert server.chat("a prompt")["usage"]["completion_tokens"] == 12  # no max_tokens
    bad = server.post("/v1/chat/completions", body("a prompt", max_tokens=0))
    assert bad.status_code == 400 and "max_tokens" in bad.json()["message"]
    unknown = server.post("/v1/chat/completions", {**body("a prompt"), "model": "other"})
    assert unknown.status_code == 404


def test_no_more_than_slots_requests_decode_at_once_and_stats_add_up(start):
    server = start("--slots", "2", "--step-ms", "10", "--lengths", "uniform")
    server.chat("warm-up", max_tokens=1)
    assert server.post("/stats/reset").json()["requests"] == 0

    async def four_and_a_reset() -> tuple[list[dict], int]:
        async with httpx.AsyncClient(timeout=60) as client:
            sent = [
                asyncio.create_task(
                    client.post(
                        f"{server.root}/v1/chat/completions", json=body(f"p{i}", max_tokens=20)
                    )
                )
                for i in range(4)
            ]
            for _ in range(1000):  # until the engine has them
                stats = (await client.get(f"{server.root}/stats")).json()
                if stats["running"] or stats["waiting"]:
                    break
                await asyncio.sleep(0.005)
            busy_reset = (await client.post(f"{server.root}/stats/reset")).status_code
            return [(await r).json()["gpu_like"] for r in sent], busy_reset

    steps, busy_reset = asyncio.run(four_and_a_reset())
    assert busy_reset == 409  # counters are not reset under a running client
    steps.sort(key=lambda s: s["start_step"])
    assert all(s["finish_step"] - s["start_step"] == 20 for s in steps)
    first_done = min(s["finish_step"] for s in steps[:2])
    assert steps[2]["start_step"] >= first_done and steps[3]["start_step"] >= first_done
    assert steps[3]["finish_step"] - steps[0]["start_step"] >= 40  # two answers' worth

    stats = server.get("/stats").json()
    assert stats["max_running"] == 2 and stats["max_waiting"] >= 2
    assert stats["completed"] == 4 and stats["requests"] == 4
    assert stats["completion_tokens"] == stats["busy_slot_steps"] == 80
    window = stats["last_answer_step"] - stats["first_request_step"]
    assert stats["window_steps"] == window >= 40
    assert stats["occupancy"] == pytest.approx(80 / (2 * window))
    assert stats["steps"] >= window and stats["window_seconds"] > 0
    assert stats["nominal_steps_per_s"] == pytest.approx(100)
    assert stats["steps_per_s"] == pytest.approx(window / stats["window_seconds"])

    assert server.post("/stats/reset").status_code == 200
    zero = server.get("/stats").json()
    assert (zero["requests"], zero["busy_slot_steps"], zero["occupancy"]) == (0, 0, None)


def test_listens_on_loopback_only_and_describes_the_model(start):
    server = start("--max-model-len", "4096")
    assert server.get("/health").status_code == 200
    models = server.get("/v1/models").json()["data"]
    assert [(m["id"], m["max_model_len"]) for m in models] == [(MODEL, 4096)]
    listening = [
        c.laddr
        for c in psutil.Process(server.process.pid).net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    ]
    assert listening and {addr.ip for addr in listening} == {"127.0.0.1"}


def test_sliding_window_baseline_writes_every_answer_as_it_lands(start, tmp_path):
    server = start("--step-ms", "1", "--lengths", "uniform", "--uniform-tokens", "4")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"q{i}"}) + "\n" for i in range(40)))
    stats = tmp_path / "stats.json"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.baselines.sliding_window",
            "--base-url",
            server.root + "/v1",
            "--model",
            MODEL,
            "--prompts",
            prompts,
            "--output",
            tmp_path / "answers.jsonl",
            "--stats",
            stats,
            "--max-tokens",
            "100",
            "--concurrency",
            "8",
        ],
        cwd=ROOT,
        check=True,
        timeout=120,
    )
    rows = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert sorted(r["index"] for r in rows) == list(range(40))
    assert json.loads(stats.read_text())["completion_tokens"] == 160
    server_stats = server.get("/stats").json()
    assert server_stats["completed"] == 40 and server_stats["max_running"] <= 8
