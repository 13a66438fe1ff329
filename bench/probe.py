"""Run a Python module with its training calls instrumented; write what it measured.

    python -m bench.probe train STATS.json -m openkd train ...
    python -m bench.probe train STATS.json -m bench.baselines.plain_trl ...

`train` runs openkd and the plain TRL baseline the same way, so their tokens/s are measured
identically: tokens are counted in the batches the model is given (`input_ids` elements, and the
non-padding ones from `attention_mask`; padding-free batches have none), time runs from the
first training step until `Trainer.train` returns (checkpoint saves inside it included), both
as wall time and as this process's CPU time (which a busy machine disturbs less).

    python -m bench.probe onpolicy STATS.json -m openkd train --loss on-policy ...

`onpolicy` times the loop the same way; its batches are prompts the trainer samples answers to,
so tokens are counted in what TRL's `DistillationTrainer` builds from them (prompt and sampled
tokens: `prompt_mask` and `completion_mask`), for openkd's subclass and a plain script alike.
"""

from __future__ import annotations

import json
import runpy
import sys
import time
from pathlib import Path
from typing import Any


class TrainerProbe:
    def __init__(self) -> None:
        self.first_step: float | None = None
        self.train_end: float | None = None
        self.first_step_cpu = 0.0
        self.train_end_cpu = 0.0
        self.step_starts: list[float] = []
        self.step_cpu_starts: list[float] = []
        self.steps = 0
        self.tensor_tokens = 0
        self.real_tokens = 0
        self.batch_rows = 0

    def install(self) -> None:
        from transformers import Trainer

        probe = self
        training_step = Trainer.training_step
        train = Trainer.train

        def counted_step(self: Any, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any):
            now = time.perf_counter()
            if probe.first_step is None:
                probe.first_step = now
                probe.first_step_cpu = time.process_time()
            probe.step_starts.append(now)
            probe.step_cpu_starts.append(time.process_time())
            probe.steps += 1
            probe.count(inputs)
            return training_step(self, model, inputs, *args, **kwargs)

        def timed_train(self: Any, *args: Any, **kwargs: Any):
            try:
                return train(self, *args, **kwargs)
            finally:
                probe.train_end = time.perf_counter()
                probe.train_end_cpu = time.process_time()

        Trainer.training_step = counted_step  # type: ignore[method-assign]
        Trainer.train = timed_train  # type: ignore[method-assign]

    def count(self, inputs: dict[str, Any]) -> None:
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        self.batch_rows += int(ids.shape[0])
        self.tensor_tokens += int(ids.numel())
        self.real_tokens += int(mask.sum()) if mask is not None else int(ids.numel())

    def stats(self) -> dict[str, Any]:
        seconds = (
            self.train_end - self.first_step
            if self.first_step is not None and self.train_end is not None
            else None
        )
        return {
            "steps": self.steps,
            "seconds": seconds,
            "cpu_seconds": self.train_end_cpu - self.first_step_cpu if seconds else None,
            "tensor_tokens": self.tensor_tokens,
            "real_tokens": self.real_tokens,
            "batch_rows": self.batch_rows,
            # Each step's share of the loop: until the next step starts (the last one until
            # train() returns, so it holds the final checkpoint save).
            "step_seconds": [
                b - a
                for a, b in zip(
                    self.step_starts, [*self.step_starts[1:], self.train_end or 0], strict=True
                )
            ]
            if seconds
            else [],
            # The same in this process's CPU time, which other load on the machine disturbs less.
            "step_cpu_seconds": [
                b - a
                for a, b in zip(
                    self.step_cpu_starts,
                    [*self.step_cpu_starts[1:], self.train_end_cpu],
                    strict=True,
                )
            ]
            if seconds
            else [],
        }


class OnPolicyProbe(TrainerProbe):
    """Tokens of the sampled batches: prompt and sampled tokens, counted where TRL builds them."""

    def install(self) -> None:
        super().install()
        from trl.trainer.distillation_trainer import DistillationTrainer

        probe = self
        build = DistillationTrainer._generate_and_score_completions

        def counted_build(self: Any, inputs: Any) -> dict[str, Any]:
            out = build(self, inputs)
            if self.model.training:
                prompt, completion = out["prompt_mask"], out["completion_mask"]
                probe.batch_rows += int(prompt.shape[0])
                probe.tensor_tokens += int(prompt.numel() + completion.numel())
                probe.real_tokens += int(prompt.sum() + completion.sum())
            return out

        DistillationTrainer._generate_and_score_completions = counted_build  # type: ignore[method-assign]

    def count(self, inputs: Any) -> None:
        """The step's inputs are prompts; its tokens are counted when they are sampled."""


PROBES: dict[str, type[TrainerProbe]] = {"train": TrainerProbe, "onpolicy": OnPolicyProbe}


def main() -> None:
    if len(sys.argv) < 5 or sys.argv[1] not in PROBES or sys.argv[3] != "-m":
        sys.exit("usage: python -m bench.probe train|onpolicy STATS.json -m MODULE [ARGS...]")
    kind, stats_path, module, args = sys.argv[1], Path(sys.argv[2]), sys.argv[4], sys.argv[5:]
    probe = PROBES[kind]()
    probe.install()
    sys.argv = [module, *args]
    code: Any = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code
    stats_path.write_text(json.dumps(probe.stats()))
    sys.exit(code)


if __name__ == "__main__":
    main()
