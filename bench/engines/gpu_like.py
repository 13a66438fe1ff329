"""A GPU-like stand-in for a vLLM server: continuous batching where one decode step costs the
same whatever the number of running sequences, and no model.

Why: on a GPU, decoding is memory-bound, so a vLLM step over 10 sequences takes about as long as
one over 256, while a teacher's answers vary in length by 100x. A client that waits for the
slowest answer of a batch before sending more leaves most of such an engine idle. A CPU hides
that (a CPU step costs in proportion to the running sequences), so this server keeps the GPU's
cost model without a GPU, and clients' scheduling can be measured on any machine.

The engine: at most `--slots` requests decode at once; the others wait in a FIFO queue and join
at the start of a step. One step runs every `--step-ms`, on deadlines fixed against the monotonic
clock (steps do not drift; a server up to `CATCH_UP` steps late runs the missed steps at once,
one later than that skips them, and skipped steps show as a step rate below nominal). A step
adds one token to every running request, whatever their number. A request's answer length is a
function of its last user message and `--seed` alone, so every client sees the same lengths:
lognormal (`--median`, `--sigma`, capped at `--cap`) or `--uniform-tokens` for every prompt. It
finishes at that length (finish_reason "stop") or at its max_tokens when that is shorter
("length"). Requests leave through a heap keyed by their finish step, so a step costs O(1) plus
O(log n) per request joining or leaving, not O(running).

    python -m bench.engines.gpu_like --port 8000 --slots 256 --step-ms 10 --lengths lognormal \
        --median 60 --sigma 1.1 --cap 1000 --model teacher

Endpoints, on 127.0.0.1 only: GET /health, GET /v1/models (with max_model_len), POST
/v1/chat/completions (not streamed; the answer is that many words "tok", with usage, and the
request's queue/start/finish steps under "gpu_like"), GET /stats and POST /stats/reset (409
while requests are in flight). `--port 0` picks a free port; the first line on stdout is
"listening on http://127.0.0.1:PORT".

/stats counts since the last reset: steps, busy slot-steps (running requests summed over steps),
requests, completed requests, completion tokens, and the window from the first request to the
last answer (steps and seconds). Slot occupancy = busy slot-steps / (slots * window steps), the
share of the engine the client kept busy; completion tokens / window seconds is the client's
throughput with its own start-up left out. steps_per_s over the window against the nominal rate
tells whether the server kept up; it warns on stderr when a second falls 5 % or more behind.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import heapq
import itertools
import json
import math
import signal
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

HOST = "127.0.0.1"
# Steps a late server runs back to back to get back on schedule; further behind, it skips.
CATCH_UP = 5
# A second whose step rate is below this share of nominal is reported as falling behind.
KEEPING_UP = 0.95
WARN_EVERY_S = 10.0


# --- answer lengths ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Lengths:
    """Answer length in tokens as a function of the prompt text and the seed."""

    kind: str = "lognormal"  # or "uniform"
    median: float = 60.0
    sigma: float = 1.1
    cap: int = 1000
    uniform_tokens: int = 60
    seed: int = 0

    def __call__(self, prompt: str) -> int:
        if self.kind == "uniform":
            return self.uniform_tokens
        digest = hashlib.blake2b(f"{self.seed}\0{prompt}".encode(), digest_size=8).digest()
        u = (int.from_bytes(digest, "big") + 0.5) / 2**64  # in (0, 1), never 0 or 1
        z = NormalDist().inv_cdf(u)
        return max(1, min(self.cap, round(self.median * math.exp(self.sigma * z))))

    def describe(self) -> dict[str, Any]:
        if self.kind == "uniform":
            return {"kind": "uniform", "tokens": self.uniform_tokens, "seed": self.seed}
        return {
            "kind": "lognormal",
            "median": self.median,
            "sigma": self.sigma,
            "cap": self.cap,
            "seed": self.seed,
        }


def prompt_text(messages: list[Any]) -> str:
    """The last user message's text: what decides the answer's length (system prompts do not)."""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):  # content parts
                return "".join(
                    str(part.get("text", "")) for part in content if isinstance(part, dict)
                )
            return str(content or "")
    return ""


# --- the engine --------------------------------------------------------------------------------


@dataclass
class Request:
    tokens: int
    future: asyncio.Future[dict[str, int]]
    queued_step: int
    start_step: int = -1


@dataclass
class Window:
    """Counters since the last reset."""

    reset_step: int
    reset_at: float
    requests: int = 0
    completed: int = 0
    completion_tokens: int = 0
    busy_slot_steps: int = 0
    max_running: int = 0
    max_waiting: int = 0
    skipped_steps: int = 0
    lag_sum: float = 0.0
    lag_max: float = 0.0
    first_request_step: int | None = None
    first_request_at: float | None = None
    last_answer_step: int | None = None
    last_answer_at: float | None = None


@dataclass
class Engine:
    """Continuous batching with a constant step cost; `advance()` is one step."""

    slots: int
    step_seconds: float
    clock: Callable[[], float] = time.monotonic
    step: int = 0  # steps done since start
    running: int = 0
    waiting: deque[Request] = field(default_factory=deque)
    finishing: list[tuple[int, int, Request]] = field(default_factory=list)  # heap
    window: Window = field(init=False)
    _order: itertools.count = field(default_factory=itertools.count)

    def __post_init__(self) -> None:
        self.window = Window(self.step, self.clock())

    def submit(self, tokens: int) -> asyncio.Future[dict[str, int]]:
        """Queue a request for `tokens` tokens; the future resolves to its steps when done."""
        if tokens < 1:
            raise ValueError("a request needs at least one token")
        w = self.window
        future: asyncio.Future[dict[str, int]] = asyncio.get_running_loop().create_future()
        self.waiting.append(Request(tokens, future, self.step))
        w.requests += 1
        w.max_waiting = max(w.max_waiting, len(self.waiting))
        if w.first_request_step is None:
            w.first_request_step, w.first_request_at = self.step, self.clock()
        return future

    def advance(self, lag: float = 0.0) -> None:
        """One decode step: admit waiting requests into free slots, add a token to each running
        request, release those that reached their length."""
        w = self.window
        while self.waiting and self.running < self.slots:
            request = self.waiting.popleft()
            request.start_step = self.step
            heapq.heappush(self.finishing, (self.step + request.tokens, next(self._order), request))
            self.running += 1
        w.busy_slot_steps += self.running
        w.max_running = max(w.max_running, self.running)
        w.lag_sum += lag
        w.lag_max = max(w.lag_max, lag)
        self.step += 1
        now = None
        while self.finishing and self.finishing[0][0] <= self.step:
            _, _, request = heapq.heappop(self.finishing)
            self.running -= 1
            w.completed += 1
            w.completion_tokens += request.tokens
            now = now if now is not None else self.clock()
            w.last_answer_step, w.last_answer_at = self.step, now
            if not request.future.done():  # a cancelled handler's request still ran its course
                request.future.set_result(
                    {
                        "queued_step": request.queued_step,
                        "start_step": request.start_step,
                        "finish_step": self.step,
                    }
                )

    def busy(self) -> bool:
        return bool(self.running or self.waiting)

    def reset(self) -> None:
        self.window = Window(self.step, self.clock())

    async def run(self, warn: Callable[[str], None]) -> None:
        """Step forever on the monotonic clock's schedule."""
        start = self.clock()
        done = 0  # steps on this schedule
        checked_at, checked_steps, warned_at = start, 0, -math.inf
        while True:
            deadline = start + (done + 1) * self.step_seconds
            delay = deadline - self.clock()
            await asyncio.sleep(max(delay, 0.0))  # 0 still lets waiting I/O through
            now = self.clock()
            late = now - deadline
            if late > CATCH_UP * self.step_seconds:  # too far behind: skip, do not burst
                skipped = int(late / self.step_seconds)
                self.window.skipped_steps += skipped
                done += skipped
                late -= skipped * self.step_seconds
            self.advance(late)
            done += 1
            if now - checked_at >= 1.0:
                expected = (now - checked_at) / self.step_seconds
                rate = (self.step - checked_steps) / expected
                if rate < KEEPING_UP and self.busy() and now - warned_at >= WARN_EVERY_S:
                    warn(
                        f"warning: the engine fell behind: {rate:.1%} of the nominal "
                        f"{1 / self.step_seconds:.0f} steps/s over the last {now - checked_at:.1f} s"
                    )
                    warned_at = now
                checked_at, checked_steps = now, self.step

    def stats(self) -> dict[str, Any]:
        w = self.window
        nominal = 1 / self.step_seconds
        window_steps = window_seconds = None
        if w.first_request_step is not None and w.last_answer_step is not None:
            window_steps = w.last_answer_step - w.first_request_step
            window_seconds = w.last_answer_at - w.first_request_at
        steps = self.step - w.reset_step
        rate = window_steps / window_seconds if window_steps and window_seconds else None
        return {
            "slots": self.slots,
            "step_ms": self.step_seconds * 1000,
            "steps": steps,
            "busy_slot_steps": w.busy_slot_steps,
            "requests": w.requests,
            "completed": w.completed,
            "completion_tokens": w.completion_tokens,
            "running": self.running,
            "waiting": len(self.waiting),
            "max_running": w.max_running,
            "max_waiting": w.max_waiting,
            "first_request_step": w.first_request_step,
            "last_answer_step": w.last_answer_step,
            "first_request_s": _since(w.first_request_at, w.reset_at),
            "last_answer_s": _since(w.last_answer_at, w.reset_at),
            "window_steps": window_steps,
            "window_seconds": window_seconds,
            "occupancy": (
                w.busy_slot_steps / (self.slots * window_steps) if window_steps else None
            ),
            "tokens_per_s": w.completion_tokens / window_seconds if window_seconds else None,
            "nominal_steps_per_s": nominal,
            "steps_per_s": rate,
            "step_rate": rate / nominal if rate is not None else None,
            "behind": rate is not None and rate < KEEPING_UP * nominal,
            "skipped_steps": w.skipped_steps,
            "mean_lag_ms": 1000 * w.lag_sum / steps if steps else 0.0,
            "max_lag_ms": 1000 * w.lag_max,
        }


def _since(t: float | None, origin: float) -> float | None:
    return None if t is None else t - origin


# --- HTTP --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    model: str
    lengths: Lengths
    max_model_len: int


def _error(status: int, message: str) -> Any:
    from aiohttp import web

    kind = {400: "BadRequestError", 404: "NotFoundError", 409: "ConflictError"}
    body = {"object": "error", "message": message, "type": kind.get(status, "Error")}
    return web.json_response({**body, "param": None, "code": status}, status=status)


def make_app(engine: Engine, settings: Settings) -> Any:
    from aiohttp import web

    ids = itertools.count(1)
    created = int(time.time())

    async def health(request: web.Request) -> web.Response:
        return web.Response()

    async def models(request: web.Request) -> web.Response:
        model = {
            "id": settings.model,
            "object": "model",
            "created": created,
            "owned_by": "gpu-like",
            "root": settings.model,
            "max_model_len": settings.max_model_len,
        }
        return web.json_response({"object": "list", "data": [model]})

    async def chat(request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "the request body is not JSON")
        if not isinstance(body, dict):
            return _error(400, "the request body must be a JSON object")
        if body.get("model") != settings.model:
            return _error(404, f"The model `{body.get('model')}` does not exist.")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return _error(400, "messages must be a non-empty list")
        if body.get("stream"):
            return _error(400, "this stand-in does not stream")
        if body.get("n") not in (None, 1):
            return _error(400, "this stand-in answers n=1 only")
        limit = body.get("max_completion_tokens")
        limit = body.get("max_tokens") if limit is None else limit
        limit = settings.max_model_len if limit is None else limit
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            return _error(400, f"max_tokens must be a positive integer, got {limit!r}")
        text = prompt_text(messages)
        natural = settings.lengths(text)
        tokens = min(natural, limit)
        steps = await engine.submit(tokens)
        prompt_tokens = sum(
            len(str(m.get("content") or "").split()) for m in messages if isinstance(m, dict)
        )
        return web.json_response(
            {
                "id": f"chatcmpl-gpu-like-{next(ids)}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": settings.model,
                "system_fingerprint": "gpu-like",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": " ".join(["tok"] * tokens)},
                        "finish_reason": "length" if natural > limit else "stop",
                        "logprobs": None,
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": tokens,
                    "total_tokens": prompt_tokens + tokens,
                },
                "gpu_like": steps,
            }
        )

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(engine.stats())

    async def reset(request: web.Request) -> web.Response:
        if engine.busy():
            return _error(
                409,
                f"{engine.running} requests running and {len(engine.waiting)} waiting; "
                "reset when the engine is idle",
            )
        engine.reset()
        return web.json_response(engine.stats())

    app = web.Application(client_max_size=64 * 2**20)
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/stats", stats)
    app.router.add_post("/stats/reset", reset)
    return app


async def serve(port: int, engine: Engine, settings: Settings) -> None:
    """Serve until SIGTERM or SIGINT; the first stdout line names the address."""
    from aiohttp import web

    def warn(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    runner = web.AppRunner(make_app(engine, settings), access_log=None, handle_signals=False)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    stepping = asyncio.create_task(engine.run(warn))
    try:
        site = web.TCPSite(runner, HOST, port, backlog=4096)
        await site.start()
        bound = runner.addresses[0][1]  # the real port when --port 0
        print(f"listening on http://{HOST}:{bound}", flush=True)
        print(
            json.dumps(
                {
                    "slots": engine.slots,
                    "step_ms": engine.step_seconds * 1000,
                    "model": settings.model,
                    "lengths": settings.lengths.describe(),
                    "event_loop": type(loop).__module__,
                }
            ),
            flush=True,
        )
        await stop.wait()
    finally:
        stepping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await stepping
        await runner.cleanup()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.engines.gpu_like",
        description="An OpenAI-compatible server with a GPU engine's timing and no model.",
    )
    parser.add_argument("--port", type=int, required=True, help="0 picks a free port")
    parser.add_argument("--slots", type=int, default=256, help="requests decoding at once")
    parser.add_argument("--step-ms", type=float, default=10.0, help="one decode step")
    parser.add_argument("--lengths", choices=("lognormal", "uniform"), default="lognormal")
    parser.add_argument("--median", type=float, default=60.0, help="lognormal median, tokens")
    parser.add_argument("--sigma", type=float, default=1.1, help="lognormal sigma")
    parser.add_argument("--cap", type=int, default=1000, help="longest lognormal answer")
    parser.add_argument("--uniform-tokens", type=int, default=60, help="every answer's length")
    parser.add_argument("--model", default="gpu-like", help="the served model name")
    parser.add_argument("--max-model-len", type=int, default=32768)
    parser.add_argument("--seed", type=int, default=0, help="answer lengths depend on it")
    args = parser.parse_args(argv)
    problems = [
        f"{flag} must be positive"
        for flag, value in (
            ("--slots", args.slots),
            ("--step-ms", args.step_ms),
            ("--median", args.median),
            ("--cap", args.cap),
            ("--uniform-tokens", args.uniform_tokens),
            ("--max-model-len", args.max_model_len),
        )
        if value <= 0
    ]
    if args.sigma < 0:
        problems.append("--sigma must not be negative")
    if not 0 <= args.port < 65536:
        problems.append("--port must be 0-65535")
    if problems:
        parser.error("; ".join(problems))
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    lengths = Lengths(
        args.lengths, args.median, args.sigma, args.cap, args.uniform_tokens, args.seed
    )
    engine = Engine(args.slots, args.step_ms / 1000)
    settings = Settings(args.model, lengths, args.max_model_len)
    try:
        import uvloop  # vLLM's server runs on it too; the step loop keeps time better with it
    except ImportError:
        asyncio.run(serve(args.port, engine, settings))
    else:
        uvloop.run(serve(args.port, engine, settings))


if __name__ == "__main__":
    main()
