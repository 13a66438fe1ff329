"""`openkd train --loss on-policy` with the teacher behind a vLLM server.

TRL's `ServerDistillationTrainer` (experimental) computes the loss: the student's samples go
to the server, which returns the teacher's log-probability of each sampled token
(`prompt_logprobs`), and the divergence is taken over that token plus a tail bucket (TRL's
restriction for beta > 0: the server cannot give the whole distribution). openkd's additions
(`OpenkdOnPolicyTrainer`: prompt fitting, samples per prompt, GKD's offline steps, the guard,
the step-time shares, the run results) come first in the MRO; this class adds the timing of
the server call and the reverse-KL metric over the same support ("top-1+tail estimate").
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import torch

from openkd.train.onpolicy.served import SERVED_KL
from openkd.train.onpolicy.trainer import OpenkdOnPolicyTrainer

warnings.filterwarnings("ignore", message=".*experimental.*", module="trl")
from trl.experimental.server_distillation import ServerDistillationTrainer  # noqa: E402
from trl.trainer.distillation_trainer import DistillationTrainer  # noqa: E402


class _ServerDistillation(ServerDistillationTrainer):
    """TRL's server trainer, given openkd's client instead of building its own."""

    def __init__(self, *, teacher_client: Any, **kwargs: Any) -> None:
        # As ServerDistillationTrainer.__init__, less its VLLMClient (see `client`).
        DistillationTrainer.__init__(self, teacher_model=None, **kwargs)
        args = kwargs["args"]
        self.reverse_kl_top_1_mode = args.reverse_kl_top_1_mode
        self.loss_top_k = args.loss_top_k
        self.loss_add_tail = args.loss_add_tail
        self.teacher_client = teacher_client


class OpenkdServedTrainer(OpenkdOnPolicyTrainer, _ServerDistillation):
    """On-policy distillation scored by a teacher server (see the module docstring)."""

    reverse_kl_kind = SERVED_KL

    def train(self, *args: Any, **kwargs: Any) -> Any:
        from transformers.trainer_callback import ProgressCallback

        from openkd.teacher.client import TeacherServerError

        try:
            return super().train(*args, **kwargs)
        except TeacherServerError:
            # End the progress bar's line, so the one-line error starts its own.
            for callback in self.callback_handler.callbacks:
                bar = getattr(callback, "training_bar", None)
                if isinstance(callback, ProgressCallback) and bar is not None:
                    bar.close()
                    callback.training_bar = None
            raise

    def _get_teacher_token_logprobs_from_server(self, inputs, aligned_prompt_length):
        started = time.perf_counter()
        result = super()._get_teacher_token_logprobs_from_server(inputs, aligned_prompt_length)
        if self._training:
            self.times.add("score", time.perf_counter() - started)
        return result

    def _compute_server_sparse_top_1_divergence_loss(
        self, teacher_result, student_log_probs, completion_tokens, labels
    ):
        self._record_served_kl(teacher_result, student_log_probs, labels)
        return super()._compute_server_sparse_top_1_divergence_loss(
            teacher_result, student_log_probs, completion_tokens, labels
        )

    def _compute_server_forward_kl_loss(self, teacher_result, student_log_probs, labels):
        self._record_served_kl(teacher_result, student_log_probs, labels)
        return super()._compute_server_forward_kl_loss(teacher_result, student_log_probs, labels)

    def _record_served_kl(
        self, teacher_result: dict[str, torch.Tensor], student_log_probs: Any, labels: Any
    ) -> None:
        if not self._measuring:
            return
        from openkd.distill.divergence import top1_tail_reverse_kl_sum

        total, count = top1_tail_reverse_kl_sum(
            student_log_probs, teacher_result["actual_logprobs"], labels
        )
        self._append_reverse_kl(total, count)
