"""TRL's `DistillationTrainer` with openkd's additions; the loss and the sampling stay TRL's.

- Prompts that leave no room for `--max-completion-length` within `--max-length` are dropped
  before training (TRL does not cut prompts), and counted.
- `--num-samples N`: each prompt of a step is sampled N times (TRL samples once).
- `--kd-lambda` below 1 (GKD's mix): a step is offline with probability 1 - lambda, decided
  from the seed and the step number (the same on every process and after a resume); it scores
  the dataset's answer instead of a sample, with the same divergence.
- Metrics: the exact per-token reverse KL(student || teacher) at temperature 1 on the step's
  samples, measured on the first step, every logging step and the last (one extra pass of both
  heads, without gradients); the share of step time spent sampling and in the teacher's
  forward pass.
- The non-finite guard of every `openkd train` run.
"""

from __future__ import annotations

import random
import time
import warnings
from collections import defaultdict
from typing import Any

import torch

from openkd.train.guard import GuardedTrainer
from openkd.train.onpolicy.data import fit_datasets
from openkd.train.trainer import PreparedStats

# TRL warns on import that it was tested with vLLM <= 0.31; openkd pins the pair it tests
# (`openkd.versions`) and student sampling here is transformers' unless sft_args asks for vLLM.
warnings.filterwarnings("ignore", message="TRL currently supports vLLM versions")
from trl import DistillationTrainer  # noqa: E402
from trl.trainer.utils import RepeatSampler  # noqa: E402


class StepTimes:
    """Seconds spent per part of the training steps, since the last log and over the run."""

    PARTS = ("step", "generate", "score")

    def __init__(self) -> None:
        self.window: dict[str, float] = defaultdict(float)
        self.total: dict[str, float] = defaultdict(float)

    def add(self, part: str, seconds: float) -> None:
        self.window[part] += seconds
        self.total[part] += seconds

    def shares(self, times: dict[str, float]) -> dict[str, float]:
        step = times.get("step", 0.0)
        if step <= 0:
            return {}
        return {f"{part}_share": times.get(part, 0.0) / step for part in ("generate", "score")}

    def flush(self) -> dict[str, float]:
        """The shares of step time since the last call (for a log line)."""
        shares = self.shares(self.window)
        self.window.clear()
        return shares


def _sync(tensor: torch.Tensor) -> None:
    if tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)


class OpenkdOnPolicyTrainer(GuardedTrainer, DistillationTrainer):
    """On-policy distillation for `openkd train --loss on-policy` (see the module docstring)."""

    reverse_kl_kind = "exact"  # over the whole vocabulary (`openkd.train.onpolicy.served`)

    def __init__(
        self,
        *args: Any,
        eos_id: int,
        samples_per_prompt: int,
        lmbda: float,
        max_length: int,
        **kwargs: Any,
    ) -> None:
        self.eos_id = eos_id
        self.samples_per_prompt = samples_per_prompt
        self.lmbda = lmbda
        self.prepared: dict[str, PreparedStats] = fit_datasets(kwargs, max_length)
        self.times = StepTimes()
        self._offline: list[tuple[list, list]] | None = None
        self._batch_offline = False
        self._measuring = False
        self._hidden: dict[str, torch.Tensor] = {}
        super().__init__(*args, **kwargs)
        self.attach_guard()

    @property
    def _training(self) -> bool:
        return bool(getattr(self.model, "training", False))

    # Data -------------------------------------------------------------------------------

    def _get_train_sampler(self, dataset: Any = None) -> Any:
        if self.samples_per_prompt == 1:
            return super()._get_train_sampler(dataset)
        # As TRL's, with each prompt of a generation batch sampled `samples_per_prompt` times.
        args = self.args
        generation_batch = (
            args.per_device_train_batch_size
            * self.accelerator.num_processes
            * args.gradient_accumulation_steps
        )
        source: Any = self.train_dataset if dataset is None else dataset
        return RepeatSampler(
            data_source=source,
            mini_repeat_count=self.samples_per_prompt,
            batch_size=generation_batch // self.samples_per_prompt,
            repeat_count=args.gradient_accumulation_steps,
            shuffle=bool(self.shuffle_dataset),
            seed=args.seed,
        )

    # Offline steps (GKD's lambda) -------------------------------------------------------

    def step_is_offline(self, step: int) -> bool:
        """Whether optimizer step `step` (0-based) scores the dataset's answers."""
        if self.lmbda >= 1.0:
            return False
        return random.Random(f"{self.args.seed}:{step}").random() >= self.lmbda

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        offline = self._training and self.step_is_offline(self.state.global_step)
        self._batch_offline = offline
        if offline:
            self._offline = [(x["prompt"], x["completion"]) for x in inputs]
        try:
            return super()._generate_and_score_completions(inputs)
        finally:
            self._offline = None

    def _answer_ids(self, prompt_ids: list[int], prompt: list, completion: list) -> list[int]:
        """The dataset's answer as the student's template renders it after the prompt."""
        tokenizer = self._tokenizer
        full = tokenizer.apply_chat_template(
            [*prompt, *completion], tokenize=True, return_dict=False
        )
        if list(full[: len(prompt_ids)]) == list(prompt_ids):
            answer = list(full[len(prompt_ids) :])
        else:  # a template that renders earlier turns differently: the answer text and EOS
            text = "".join(m["content"] for m in completion)
            answer = tokenizer(text, add_special_tokens=False)["input_ids"] + [self.eos_id]
        if self.eos_id in answer:
            answer = answer[: answer.index(self.eos_id) + 1]
        return answer[: self.max_completion_length]

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, has_tool_images=False):
        if self._offline is not None:
            return [
                self._answer_ids(ids, prompt, completion)
                for ids, (prompt, completion) in zip(prompt_ids, self._offline, strict=True)
            ]
        started = time.perf_counter()
        completion_ids = super()._generate_single_turn(
            prompt_ids, images, multimodal_fields, has_tool_images
        )
        if self._training:
            self.times.add("generate", time.perf_counter() - started)
        return completion_ids

    # Teacher time and the reverse-KL metric ---------------------------------------------

    def _get_last_hidden_state(self, unwrapped_model, input_ids, *args, **kwargs):
        teacher = unwrapped_model is self.accelerator.unwrap_model(self.teacher_model)
        if teacher:
            _sync(input_ids)
            started = time.perf_counter()
        hidden = super()._get_last_hidden_state(unwrapped_model, input_ids, *args, **kwargs)
        if teacher:
            _sync(hidden)
            if self._training:
                self.times.add("score", time.perf_counter() - started)
        if self._measuring:
            self._hidden["teacher" if teacher else "student"] = hidden
        return hidden

    def _measures(self) -> bool:
        """Measure the reverse KL on this micro-batch: eval, or a logged on-policy step."""
        if not self._training:
            return True
        if self._batch_offline:
            return False
        step = self.state.global_step + 1  # the optimizer step this micro-batch belongs to
        return (
            step == 1
            or step % max(1, int(self.args.logging_steps)) == 0
            or step >= self.state.max_steps
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._measuring = self._measures()
        try:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if self._measuring and len(self._hidden) == 2:
                self._record_reverse_kl(inputs)
        finally:
            self._measuring = False
            self._hidden.clear()
        return result

    def _record_reverse_kl(self, inputs: dict[str, Any]) -> None:
        from openkd.distill.divergence import reverse_kl_sum

        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        total, count = reverse_kl_sum(
            self._hidden["student"],
            self.accelerator.unwrap_model(self.model),
            self._hidden["teacher"],
            self.accelerator.unwrap_model(self.teacher_model),
            mask,
        )
        self._append_reverse_kl(total, count)

    def _append_reverse_kl(self, total: torch.Tensor, count: torch.Tensor) -> None:
        """Add this micro-batch's mean reverse KL over all processes to the logged metrics."""
        sums = torch.stack([total.float(), count.float().to(total.device)])[None]
        total_v, count_v = self.accelerator.gather(sums).sum(0).tolist()
        if count_v:
            mode = "train" if self._training else "eval"
            self._metrics[mode]["reverse_kl"].append(total_v / count_v)

    # Guard and logs ---------------------------------------------------------------------

    def training_step(self, *args: Any, **kwargs: Any):
        started = time.perf_counter()
        loss = super().training_step(*args, **kwargs)
        self.times.add("step", time.perf_counter() - started)
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._training:
            logs.update(self.times.flush())
        super().log(logs, start_time)

    def run_results(self) -> dict[str, Any]:
        """On-policy figures for the run record, summary and card."""
        history = self.state.log_history
        kls = [(e["step"], e["reverse_kl"]) for e in history if e.get("reverse_kl") is not None]
        shares = self.times.shares(self.times.total)
        return {
            "reverse_kl_kind": self.reverse_kl_kind,
            "reverse_kl_start": kls[0][1] if kls else None,
            "reverse_kl_start_step": kls[0][0] if kls else None,
            "reverse_kl_end": kls[-1][1] if kls else None,
            "reverse_kl_end_step": kls[-1][0] if kls else None,
            "generate_share": round(shares["generate_share"], 4) if shares else None,
            "score_share": round(shares["score_share"], 4) if shares else None,
        }
