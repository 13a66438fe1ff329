"""`python -m bench`: run openkd's benchmarks and write bench/RESULTS.md.

python -m bench                         # everything (about 30 minutes on 2 CPU cores)
python -m bench --only generate_mock    # one benchmark (repeat --only for more)
python -m bench --list
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import time
import traceback
from pathlib import Path

from bench import BENCHMARKS, report
from bench.proc import BenchError, console
from bench.results import Failure, Result

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS = ROOT / "bench" / "RESULTS.md"
DEFAULT_WORKDIR = ROOT / "outputs" / "bench"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="Measure openkd against baselines; write RESULTS.md."
    )
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="NAME",
        help=f"run only this benchmark (repeatable, or comma-separated): {', '.join(BENCHMARKS)}",
    )
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=DEFAULT_WORKDIR,
        help="inputs (cached between runs), outputs and logs [default: outputs/bench]",
    )
    parser.add_argument(
        "--results",
        type=Path,
        default=DEFAULT_RESULTS,
        help="the Markdown file to write [default: bench/RESULTS.md]",
    )
    parser.add_argument(
        "--strict", action="store_true", help="exit 1 when a figure misses its target, too"
    )
    return parser.parse_args(argv)


def selected(only: list[str]) -> list[str]:
    names = [n.strip() for item in only for n in item.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise SystemExit(
            f"error: unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}"
        )
    return [n for n in BENCHMARKS if n in names] if names else list(BENCHMARKS)


def run_one(name: str, ctx) -> tuple[list[Result], Failure | None, str]:
    """Run one benchmark; any error becomes a reported failure so the others still run."""
    method = ""
    try:
        module = importlib.import_module(f"bench.{name}")
        method = module.METHOD
        return module.run(ctx), None, method
    except Exception as err:
        trace = ctx.path("logs", f"{name}.traceback.txt")
        trace.parent.mkdir(parents=True, exist_ok=True)
        trace.write_text(traceback.format_exc(), encoding="utf-8")
        detail = str(err) if isinstance(err, BenchError) else f"{type(err).__name__}: {err}"
        console.print(f"[bold red]{name} failed:[/] {detail}\n  (traceback: {trace})")
        first = detail.splitlines()[0] if detail else type(err).__name__
        return [], Failure(name, first), method


def _interrupt_on_term() -> None:
    """SIGTERM stops the bench like Ctrl-C, so the programs it started are stopped too."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for name in BENCHMARKS:
            doc = (importlib.import_module(f"bench.{name}").__doc__ or "").strip().splitlines()
            print(f"{name:18} {doc[0] if doc else ''}")
        return 0
    names = selected(args.only)

    from bench.context import Context

    ctx = Context.create(args.workdir)
    _interrupt_on_term()
    run_id = report.now()
    machine = report.machine_info()
    machine["omp_num_threads"] = ctx.env["OMP_NUM_THREADS"]
    started = time.monotonic()
    entries = {}
    all_results: list[Result] = []
    failures: list[Failure] = []
    for name in names:
        console.rule(f"[bold]{name}")
        t0 = time.monotonic()
        results, failure, method = run_one(name, ctx)
        entries[name] = report.entry(run_id, time.monotonic() - t0, results, failure, method)
        all_results += results
        failures += [failure] if failure else []
        for r in results:
            ratio = f"ratio {r.ratio:.3f}" if r.ratio is not None else ""
            verdict = {True: "pass", False: "[bold red]MISS[/]", None: ""}[r.passed]
            console.print(
                f"  {r.metric}: {report.fmt_value(r.openkd, r.unit)} vs "
                f"{report.fmt_value(r.baseline, r.unit)} {ratio} {verdict}"
            )
    wall = time.monotonic() - started
    data = report.record_run(
        report.load_previous(args.results),
        run_id=run_id,
        machine=machine,
        wall_seconds=wall,
        entries=entries,
    )
    args.results.parent.mkdir(parents=True, exist_ok=True)
    report.write(args.results, report.render(data, BENCHMARKS))
    misses = [r for r in all_results if r.passed is False]
    console.rule()
    console.print(
        f"{len(all_results)} figures, {len(misses)} below target, {len(failures)} benchmarks "
        f"failed; {wall / 60:.1f} min; written to {args.results}"
    )
    if failures or (args.strict and misses):
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        console.print("[bold red]interrupted[/]: RESULTS.md was not changed")
        sys.exit(130)
