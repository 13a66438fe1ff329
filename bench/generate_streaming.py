"""Stage 1 scheduling on a GPU-like engine: `openkd generate --backend openai` vs a sliding window
of requests over all prompts (Open R1's generate_reasoning.py), and distilabel's Pipeline.

On a GPU a vLLM decode step costs about the same for 10 or 256 running sequences, and a
teacher's answers vary in length by 100x: a client that waits for the slowest answer of a batch
before sending more leaves most of the engine idle. vLLM on a CPU hides that (a CPU step costs in
proportion to the running sequences), so these runs use bench/engines/gpu_like.py, a server with
a GPU engine's timing and no model. Both clients are timed by the server over the same span, its
first request to its last answer, so start-up is left out of both; slot occupancy is the share
of the engine's slots each client kept busy.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from bench import proc
from bench.context import Context
from bench.generate_openai import free_port
from bench.results import INFO, Result, Target

NAME = "generate_streaming"
PROMPTS = 2048
# distilabel runs at a small fraction of the engine, so it gets a prefix of the prompts.
DISTILABEL_PROMPTS = 256
DISTILABEL_BATCH = 64  # TextGeneration's input_batch_size in Open R1's generate.py
SLOTS = 256
STEP_MS = 10
MAX_NEW_TOKENS = 1000
IN_FLIGHT = (64, 256)
# Client CPU per answer is measured where the clients are CPU-bound: uniform lengths, 256 in flight.
CPU_ROW = ("uniform", 256)
CPU_SMALL = 32  # prompts of the short runs whose CPU is subtracted (start-up, imports, set-up)
TEACHER = "gpu-like-teacher"
LENGTHS = {
    "heavy-tailed": ("--lengths", "lognormal", "--median", "60", "--sigma", "1.1", "--cap", "1000"),
    "uniform": ("--lengths", "uniform", "--uniform-tokens", "60"),
}
SERVER_TIMEOUT = 60
RUN_TIMEOUT = 600
IDLE_TIMEOUT = 30  # a killed client's last requests drain in at most 1,000 steps (10 s)
METHOD = (
    f"bench/engines/gpu_like.py: {SLOTS} slots, one {STEP_MS} ms decode step adds a token to "
    "every running request whatever their number (a GPU's cost model), FIFO queue beyond the "
    "slots; answer lengths fixed per prompt by a hash, either heavy-tailed (lognormal, median 60 "
    "tokens, sigma 1.1, capped at 1,000) or uniform (60 tokens each). One server per length "
    f"setting, {PROMPTS:,} toy prompts, --max-new-tokens {MAX_NEW_TOKENS} (no answer is cut). "
    f"For each of {' and '.join(map(str, IN_FLIGHT))} requests in flight, `openkd generate "
    "--backend openai --base-url ... --concurrency N --overwrite` and "
    "bench/baselines/sliding_window.py (AsyncOpenAI, retries off, a window of N requests "
    "refilled as each finishes, each answer appended to a JSONL as it lands), one run each, "
    "alternating which goes first. The server's /stats is reset before each run and read after "
    "it: tokens/s = completion tokens / seconds from the run's first request to its last answer "
    "as the server saw them (process start-up excluded from both sides); slot occupancy = busy "
    "slot-steps / (slots x steps in that window). The note gives both occupancies and window "
    "times and the engine's measured step rate against nominal (a stand-in that falls behind "
    "would flatter the slower client). With uniform lengths and 256 in flight the engine "
    "finishes up to ~430 requests/s, more than one Python client process keeps up with on a "
    "2-core machine (the sliding window was CPU-bound there), so that row weighs each client's "
    "CPU per request as much as its scheduling, and moves with other load on the machine. "
    f"Client CPU per 1,000 answers ({CPU_ROW[0]} lengths, {CPU_ROW[1]} in flight): each "
    "client's whole-process CPU time (user + system, getrusage) in that run, minus the same "
    f"client's CPU on the first {CPU_SMALL} prompts run right after, over the "
    f"{PROMPTS - CPU_SMALL:,} answers between: start-up, imports, dataset loading and the first "
    "request's lazy imports cancel out, so the figure is the CPU each further answer costs "
    "(openkd: request, row, id, JSON, write, commit; baseline: request and JSON line). "
    "Last row, informational: bench/baselines/"
    "distilabel_pipeline.py (distilabel's Pipeline + TextGeneration(OpenAILLM), "
    f"input_batch_size {DISTILABEL_BATCH}, as Open R1's generate.py) on the first "
    f"{DISTILABEL_PROMPTS} prompts, heavy-tailed, against a sliding window of 256 on the same "
    f"prefix (a smaller prefix than {PROMPTS:,} because distilabel uses a few percent of the "
    "engine and would take minutes); distilabel's value is in the openkd column."
)


@dataclass(frozen=True)
class Window:
    """What the server counted over one client's run."""

    completed: int
    tokens: int
    seconds: float
    occupancy: float
    step_rate: float  # measured steps/s over nominal
    max_lag_ms: float  # the latest a step ran after its deadline
    skipped_steps: int  # steps dropped because the server was too far behind
    client_cpu_seconds: float = 0.0  # the client process's CPU time (user + system)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


class StandIn:
    """The running stand-in, seen through its /stats."""

    def __init__(self, port: int) -> None:
        self.root = f"http://127.0.0.1:{port}"
        self.base_url = f"{self.root}/v1"

    def reset(self) -> None:
        """Wait for the engine to be idle, then zero its counters."""
        import httpx

        deadline = time.monotonic() + IDLE_TIMEOUT
        while True:
            response = httpx.post(f"{self.root}/stats/reset", timeout=10)
            if response.status_code == 200:
                stats = response.json()
                if stats["requests"] or stats["busy_slot_steps"]:
                    raise proc.BenchError(f"the stand-in did not reset its counters: {stats}")
                return
            if response.status_code != 409 or time.monotonic() > deadline:
                raise proc.BenchError(
                    f"the stand-in's /stats/reset answered {response.status_code}: "
                    f"{response.text[:300]}"
                )
            time.sleep(0.5)

    def window(self, expected: int, who: str, client_cpu: float = 0.0) -> Window:
        import httpx

        stats = httpx.get(f"{self.root}/stats", timeout=10).json()
        if stats["completed"] != expected or not stats["window_seconds"]:
            raise proc.BenchError(
                f"{who} got {stats['completed']} answers from the stand-in, expected {expected}"
            )
        if stats["behind"]:
            proc.console.print(
                f"  [bold yellow]warning:[/] the stand-in ran at {stats['step_rate']:.1%} of its "
                f"nominal step rate during {who}'s run"
            )
        return Window(
            stats["completed"],
            stats["completion_tokens"],
            stats["window_seconds"],
            stats["occupancy"],
            stats["step_rate"],
            stats["max_lag_ms"],
            stats["skipped_steps"],
            client_cpu,
        )


@contextlib.contextmanager
def stand_in(ctx: Context, lengths: str) -> Iterator[StandIn]:
    port = free_port()
    log = ctx.path("logs", f"{NAME}-gpu-like-{lengths}.log")
    cmd = proc.python_module(
        "bench.engines.gpu_like",
        "--port",
        str(port),
        "--slots",
        str(SLOTS),
        "--step-ms",
        str(STEP_MS),
        *LENGTHS[lengths],
        "--model",
        TEACHER,
    )
    with proc.background(cmd, log=log, env=ctx.env) as child:
        proc.wait_healthy(
            f"http://127.0.0.1:{port}/health",
            child,
            log=log,
            timeout=SERVER_TIMEOUT,
            what="the GPU-like stand-in",
        )
        yield StandIn(port)


def openkd_run(
    ctx: Context, server: StandIn, prompts: Path, n: int, tag: str, expected: int = PROMPTS
) -> Window:
    server.reset()
    measured = ctx.run(
        f"openkd generate --backend openai --concurrency {n} ({tag})",
        proc.openkd_command(
            "generate",
            "--backend",
            "openai",
            "--base-url",
            server.base_url,
            "--teacher",
            TEACHER,
            "--dataset",
            prompts,
            "--output",
            ctx.path(NAME, f"openkd-{tag}", "teacher.jsonl"),
            "--max-new-tokens",
            str(MAX_NEW_TOKENS),
            "--concurrency",
            str(n),
            "--overwrite",
        ),
        log=f"{NAME}-openkd-{tag}",
        timeout=RUN_TIMEOUT,
    )
    return server.window(expected, "openkd", measured.cpu_seconds)


def baseline_run(
    ctx: Context, server: StandIn, prompts: Path, n: int, tag: str, *, script: str, expected: int
) -> Window:
    """One run of bench/baselines/<script>.py against the stand-in."""
    out = ctx.path(NAME, f"{script}-{tag}")
    out.mkdir(parents=True, exist_ok=True)
    if script == "sliding_window":
        label, extra = f"baseline: sliding window of {n} ({tag})", ["--concurrency", str(n)]
    else:
        label = f"distilabel Pipeline, input_batch_size {n} ({tag})"
        extra = ["--cache-dir", out / "distilabel-cache", "--input-batch-size", str(n)]
    server.reset()
    measured = ctx.run(
        label,
        proc.python_module(
            f"bench.baselines.{script}",
            "--base-url",
            server.base_url,
            "--model",
            TEACHER,
            "--prompts",
            prompts,
            "--output",
            out / "answers.jsonl",
            "--stats",
            out / "stats.json",
            "--max-tokens",
            str(MAX_NEW_TOKENS),
            *extra,
        ),
        log=f"{NAME}-{script}-{tag}",
        timeout=RUN_TIMEOUT,
    )
    return server.window(expected, script.replace("_", " "), measured.cpu_seconds)


def compare(lengths: str, n: int, ours: Window, theirs: Window) -> Result:
    note = (
        f"slot occupancy openkd {ours.occupancy:.0%}, baseline {theirs.occupancy:.0%}; "
        f"runs openkd {ours.seconds:.1f} s, baseline {theirs.seconds:.1f} s; engine step rate "
        f"{ours.step_rate:.1%}/{theirs.step_rate:.1%} of nominal"
    )
    if ours.tokens != theirs.tokens:
        note += f"; token totals differ: openkd {ours.tokens:,}, baseline {theirs.tokens:,}"
    return Result(
        NAME,
        f"completion tokens/s, {lengths} lengths, {n} in flight",
        "tok/s",
        ours.tokens_per_s,
        theirs.tokens_per_s,
        f"sliding window of {n}",
        Target("ratio_at_least", 0.97),
        note=note,
        details={"openkd": asdict(ours), "baseline": asdict(theirs)},
    )


def cpu_row(
    ctx: Context, server: StandIn, lengths: str, n: int, ours: Window, theirs: Window
) -> Result:
    """Client CPU per 1,000 answers: each side's run minus its run on the first CPU_SMALL
    prompts (start-up and first-request costs cancel out)."""
    small = ctx.prompts(CPU_SMALL)
    tag = f"{lengths}-{n}-{CPU_SMALL}"
    ours_small = openkd_run(ctx, server, small, n, tag, expected=CPU_SMALL)
    theirs_small = baseline_run(
        ctx, server, small, n, tag, script="sliding_window", expected=CPU_SMALL
    )
    answers = PROMPTS - CPU_SMALL

    def per_1k(full: Window, short: Window) -> float:
        return (full.client_cpu_seconds - short.client_cpu_seconds) / answers * 1000

    return Result(
        NAME,
        f"client CPU seconds per 1,000 answers, {lengths} lengths, {n} in flight",
        "s",
        per_1k(ours, ours_small),
        per_1k(theirs, theirs_small),
        f"sliding window of {n}",
        Target("ratio_at_most", 1.1),
        note=(
            f"whole runs openkd {ours.client_cpu_seconds:.2f} s, baseline "
            f"{theirs.client_cpu_seconds:.2f} s; on {CPU_SMALL} prompts openkd "
            f"{ours_small.client_cpu_seconds:.2f} s, baseline {theirs_small.client_cpu_seconds:.2f} s"
        ),
        details={"openkd_small": asdict(ours_small), "baseline_small": asdict(theirs_small)},
    )


def distilabel_row(ctx: Context, server: StandIn, everything: Window) -> Result:
    """distilabel vs a sliding window on a prefix of the prompts; `everything` is the sliding
    window's run over all of them, for scale."""
    prompts = ctx.prompts(DISTILABEL_PROMPTS)
    window = max(IN_FLIGHT)
    theirs = baseline_run(
        ctx,
        server,
        prompts,
        window,
        f"heavy-tailed-{window}-{DISTILABEL_PROMPTS}",
        script="sliding_window",
        expected=DISTILABEL_PROMPTS,
    )
    metric = (
        f"completion tokens/s, distilabel Pipeline (input_batch_size {DISTILABEL_BATCH}; in "
        f"the openkd column), heavy-tailed lengths, {DISTILABEL_PROMPTS} prompts"
    )
    baseline_name = f"sliding window of {window}, same prompts"
    try:
        ours = baseline_run(
            ctx,
            server,
            prompts,
            DISTILABEL_BATCH,
            f"heavy-tailed-{DISTILABEL_PROMPTS}",
            script="distilabel_pipeline",
            expected=DISTILABEL_PROMPTS,
        )
    except proc.BenchError as err:
        first = str(err).splitlines()[0]
        return Result(
            NAME,
            metric,
            "tok/s",
            0.0,
            theirs.tokens_per_s,
            baseline_name,
            INFO,
            note=f"distilabel did not run against the stand-in: {first}",
        )
    return Result(
        NAME,
        metric,
        "tok/s",
        ours.tokens_per_s,
        theirs.tokens_per_s,
        baseline_name,
        INFO,
        note=(
            f"slot occupancy distilabel {ours.occupancy:.1%}, baseline {theirs.occupancy:.0%}; "
            f"runs distilabel {ours.seconds:.1f} s, baseline {theirs.seconds:.1f} s; the "
            f"sliding window on all {PROMPTS:,} prompts: {everything.tokens_per_s:,.0f} tok/s "
            f"(distilabel {ours.tokens_per_s / everything.tokens_per_s:.2f}x)"
        ),
        details={"distilabel": asdict(ours), "baseline": asdict(theirs)},
    )


def run(ctx: Context) -> list[Result]:
    prompts = ctx.prompts(PROMPTS)
    ctx.prompts(DISTILABEL_PROMPTS)
    results = []
    measured: dict[tuple[str, int], dict[str, Window]] = {}
    for lengths in LENGTHS:
        with stand_in(ctx, lengths) as server:
            for n in sorted(IN_FLIGHT, reverse=True):
                tag = f"{lengths}-{n}"
                runs = measured[lengths, n] = {}
                # Alternate which client goes first, so slow drift of the machine hits both.
                order = ("openkd", "baseline") if len(measured) % 2 else ("baseline", "openkd")
                for side in order:
                    if side == "openkd":
                        runs[side] = openkd_run(ctx, server, prompts, n, tag)
                    else:
                        runs[side] = baseline_run(
                            ctx, server, prompts, n, tag, script="sliding_window", expected=PROMPTS
                        )
                results.append(compare(lengths, n, runs["openkd"], runs["baseline"]))
                if (lengths, n) == CPU_ROW:
                    results.append(
                        cpu_row(ctx, server, lengths, n, runs["openkd"], runs["baseline"])
                    )
            if lengths == "heavy-tailed":
                everything = measured[lengths, max(IN_FLIGHT)]["baseline"]
                results.append(distilabel_row(ctx, server, everything))
    windows = [Window(**w) for r in results for w in r.details.values()]
    rates = [w.step_rate for w in windows]
    proc.console.print(
        f"  stand-in step rate over the measured windows: {min(rates):.1%} to {max(rates):.1%} "
        f"of nominal (median {statistics.median(rates):.1%}); steps ran at most "
        f"{max(w.max_lag_ms for w in windows):.0f} ms late, "
        f"{sum(w.skipped_steps for w in windows)} skipped"
    )
    return results
