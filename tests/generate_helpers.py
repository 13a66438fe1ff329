"""Shared by the generate tests: `openkd generate` with the mock teacher, in this process."""

from __future__ import annotations

from pathlib import Path

from tests.helpers import Outcome, invoke

TEACHER = "mock-teacher"


def generate(dataset: Path, output: Path, *args: str, env: dict | None = None) -> Outcome:
    return invoke(
        "generate", "--backend", "mock", "--teacher", TEACHER, "--dataset", dataset,
        "--output", output, *args, env=env,
    )  # fmt: skip
