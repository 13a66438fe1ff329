"""Stage 1 overhead behind a server: `openkd generate --backend openai` vs a bare async OpenAI
client against the same kind of vLLM server.

Two figures: `--serve` (openkd starts its own server) against the baseline on a server the bench
starts with the same flags, and openkd's client (`--base-url`) alternating with the baseline on
one server, which leaves out server-to-server variation. Both sides are timed from a healthy
server until every answer is on disk, with the same concurrency: 64 requests in flight, passed
explicitly to both (openkd's own default is 256, more than a CPU server runs at once).
"""

from __future__ import annotations

import json
import sys

from bench import proc
from bench.context import Context
from bench.generate_vllm import UNIFORM, compare, openkd_stats
from bench.results import Result

NAME = "generate_openai"
# Fewer than generate_vllm: a CPU vLLM server runs at most 128 sequences (64 in flight here).
PROMPTS = 512
MAX_NEW_TOKENS = UNIFORM.max_new_tokens  # the random tiny model: every answer about this long
# Passed to both sides. openkd's default is 256 (1,024 per replica with --serve); a CPU vLLM
# server runs at most 128 sequences at once, and 64 is what this figure has always used.
CONCURRENCY = 64
REPEATS = 2
SERVER_TIMEOUT = 900
METHOD = (
    f"{PROMPTS} toy prompts, {MAX_NEW_TOKENS} new tokens each, greedy, tiny float32 Llama (the "
    f"random std-0.02 one: answers rarely stop early), --concurrency {CONCURRENCY} passed "
    "explicitly on both sides (openkd's default is 256, --serve 1,024 per replica; a CPU vLLM "
    "server runs at most 128 sequences), server start excluded from both. openkd's tokens/s = completion tokens / labelling time from <output>.meta.json; the "
    "baseline, bench/baselines/raw_openai.py (AsyncOpenAI, a semaphore of "
    f"{CONCURRENCY}, all prompts at once), is timed from its first request to its JSONL written. "
    "Row `--serve`: `openkd generate --backend openai --serve --dtype float32 --enforce-eager` "
    "(openkd starts and stops its own server) vs the baseline's first run against a server the "
    "bench starts with the same engine flags. Row `same server`: `openkd generate --backend "
    "openai --base-url` and the baseline alternate against that one server in the order "
    f"baseline, openkd, openkd, baseline ({REPEATS} runs each), median of each: the client-side overhead without server-to-server "
    "variation. The notes list every run's time."
)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def openkd_openai(ctx: Context, model, prompts, *, base_url: str | None) -> tuple[int, float]:
    out = ctx.path(NAME, "openkd", "teacher.jsonl")
    where = ["--base-url", base_url] if base_url else ["--serve"]
    ctx.run(
        f"openkd generate --backend openai {where[0]}",
        proc.openkd_command(
            "generate",
            "--backend",
            "openai",
            *where,
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
        log=f"{NAME}-openkd-{'url' if base_url else 'serve'}",
    )
    return openkd_stats(out)


def raw_openai(ctx: Context, model, prompts, base_url: str) -> tuple[int, float]:
    stats = ctx.path(NAME, "raw", "stats.json")
    stats.parent.mkdir(parents=True, exist_ok=True)
    ctx.run(
        "baseline: async OpenAI client",
        proc.python_module(
            "bench.baselines.raw_openai",
            "--base-url",
            base_url,
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
    return int(raw["completion_tokens"]), float(raw["seconds"])


def server_command(model, port: int) -> list[str]:
    """What `--serve` runs (openkd.generate.vllm.server), written out: same engine flags."""
    return [
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


def run(ctx: Context) -> list[Result]:
    model = ctx.tiny_model()
    prompts = ctx.prompts(PROMPTS)
    served = openkd_openai(ctx, model, prompts, base_url=None)

    port = free_port()
    base_url = f"http://127.0.0.1:{port}/v1"
    server_log = ctx.path("logs", f"{NAME}-server.log")
    ours, theirs = [], []
    with proc.background(server_command(model, port), log=server_log, env=ctx.env) as child:
        started = proc.wait_healthy(
            f"http://127.0.0.1:{port}/health", child, log=server_log, timeout=SERVER_TIMEOUT
        )
        proc.console.print(f"  baseline vLLM server healthy after {started:.0f} s")
        # baseline, openkd, openkd, baseline: a load that rises or falls during the runs (other
        # work on the machine) hits both sides alike.
        for i in range(REPEATS):
            for side in ("baseline", "openkd") if i % 2 == 0 else ("openkd", "baseline"):
                if side == "openkd":
                    ours.append(openkd_openai(ctx, model, prompts, base_url=base_url))
                else:
                    theirs.append(raw_openai(ctx, model, prompts, base_url))
    return [
        compare(
            NAME,
            "output tokens/s, --serve vs own server",
            "AsyncOpenAI client",
            [served],
            theirs[:1],
        ),
        compare(
            NAME,
            "output tokens/s, same server",
            "AsyncOpenAI client",
            ours,
            theirs,
        ),
    ]
