"""Stage 1 overhead behind a server: `openkd generate --backend openai --serve` vs a bare async
OpenAI client against the same kind of vLLM server.

openkd starts its own server (`--serve`); the baseline's server is started by the bench with
the same flags. Both are timed from the moment the server is healthy until every answer is on
disk (server start excluded from both), with the same concurrency (64, openkd's default).
"""

from __future__ import annotations

import json
import sys

from bench import proc
from bench.context import Context
from bench.generate_vllm import MAX_NEW_TOKENS, PROMPTS, openkd_stats
from bench.results import Result, Target

NAME = "generate_openai"
CONCURRENCY = 64
SERVER_TIMEOUT = 900
METHOD = (
    f"{PROMPTS} toy prompts, {MAX_NEW_TOKENS} new tokens each, greedy, tiny float32 Llama. "
    "openkd: `openkd generate --backend openai --serve --dtype float32 --enforce-eager` with its "
    f"defaults (--concurrency {CONCURRENCY}, --batch-size 256); tokens/s = completion tokens / "
    "labelling time from <output>.meta.json (starts once its server is healthy). Baseline: "
    "`python -m vllm.entrypoints.openai.api_server` started by the bench with the same engine "
    "flags, then bench/baselines/raw_openai.py (AsyncOpenAI, a semaphore of "
    f"{CONCURRENCY}, all prompts at once) timed from its first request to its JSONL written. "
    "Server start is excluded from both; usage.completion_tokens totals are compared."
)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run(ctx: Context) -> list[Result]:
    model = ctx.tiny_model()
    prompts = ctx.prompts(PROMPTS)
    out = ctx.path(NAME, "openkd", "teacher.jsonl")
    ctx.run(
        "openkd generate --backend openai --serve",
        proc.openkd_command(
            "generate",
            "--backend",
            "openai",
            "--serve",
            "--teacher",
            model,
            "--dataset",
            prompts,
            "--output",
            out,
            "--dtype",
            "float32",
            "--enforce-eager",
            "--max-new-tokens",
            str(MAX_NEW_TOKENS),
            "--concurrency",
            str(CONCURRENCY),
            "--keep-truncated",
            "--overwrite",
        ),
        log=f"{NAME}-openkd",
    )
    tokens, seconds = openkd_stats(out)

    port = free_port()
    server_log = ctx.path("logs", f"{NAME}-server.log")
    server = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model),
        "--served-model-name",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--enforce-eager",
        "--seed",
        "0",
        "--disable-uvicorn-access-log",
    ]
    stats = ctx.path(NAME, "raw", "stats.json")
    stats.parent.mkdir(parents=True, exist_ok=True)
    with proc.background(server, log=server_log, env=ctx.env) as child:
        started = proc.wait_healthy(
            f"http://127.0.0.1:{port}/health", child, log=server_log, timeout=SERVER_TIMEOUT
        )
        proc.console.print(f"  baseline vLLM server healthy after {started:.0f} s")
        ctx.run(
            "baseline: async OpenAI client",
            proc.python_module(
                "bench.baselines.raw_openai",
                "--base-url",
                f"http://127.0.0.1:{port}/v1",
                "--model",
                model,
                "--prompts",
                prompts,
                "--output",
                stats.with_name("answers.jsonl"),
                "--stats",
                stats,
                "--max-tokens",
                str(MAX_NEW_TOKENS),
                "--concurrency",
                str(CONCURRENCY),
            ),
            log=f"{NAME}-raw",
        )
    raw = json.loads(stats.read_text())
    note = (
        ""
        if raw["completion_tokens"] == tokens
        else (f"token totals differ: openkd {tokens:,}, baseline {raw['completion_tokens']:,}")
    )
    return [
        Result(
            NAME,
            "output tokens/s, server start excluded",
            "tok/s",
            tokens / seconds,
            raw["completion_tokens"] / raw["seconds"],
            "AsyncOpenAI client",
            Target("ratio_at_least", 0.97),
            note=note,
            details={"openkd_seconds": seconds, "baseline_seconds": raw["seconds"]},
        )
    ]
