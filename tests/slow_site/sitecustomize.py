"""Test-only slow-downs for the `openkd train` processes of tests/test_train_preempt.py (never
product behaviour): a test puts this folder on PYTHONPATH and sets

- OPENKD_TEST_SLOW_STEP=S: the optimizer step during which a preemption signal arrived ends S
  seconds later (a real model's step can outlast a launcher's grace period);
- OPENKD_TEST_SLOW_LOAD=S: building the trainer takes S seconds longer (a large student loading).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import time
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any


def _slow_step(module: ModuleType) -> None:
    seconds = float(os.environ["OPENKD_TEST_SLOW_STEP"])
    original = module.PreemptOnSignal.on_step_end

    def on_step_end(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self.received is not None and not getattr(self, "_slowed", False):
            self._slowed = True
            print(f"test: this step takes {seconds:g} s more", file=sys.stderr, flush=True)
            time.sleep(seconds)
        return original(self, *args, **kwargs)

    module.PreemptOnSignal.on_step_end = on_step_end


def _slow_load(module: ModuleType) -> None:
    seconds = float(os.environ["OPENKD_TEST_SLOW_LOAD"])
    original = module.build_trainer

    def build_trainer(*args: Any, **kwargs: Any) -> Any:
        rank = os.environ.get("RANK", "0")
        print(f"test: loading takes {seconds:g} s more on rank {rank}", file=sys.stderr, flush=True)
        time.sleep(seconds)
        return original(*args, **kwargs)

    module.build_trainer = build_trainer  # type: ignore[attr-defined]


_PATCHES: dict[str, tuple[str, Callable[[ModuleType], None]]] = {
    "openkd.train.preempt": ("OPENKD_TEST_SLOW_STEP", _slow_step),
    "openkd.train.prepare": ("OPENKD_TEST_SLOW_LOAD", _slow_load),
}


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Runs a patch right after its module is executed, before anyone imports names from it."""

    def find_spec(
        self, name: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if name not in _PATCHES or not os.environ.get(_PATCHES[name][0]):
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        loader, patch = spec.loader, _PATCHES[name][1]
        execute = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            execute(module)
            patch(module)

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


sys.meta_path.insert(0, _PatchAfterImport())
