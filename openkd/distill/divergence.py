"""The exact per-token reverse KL(student || teacher), from both models' final hidden states.

The quantity on-policy distillation with `--kd-beta 1` minimises, at temperature 1 whatever
the training temperature, over the whole vocabulary. It runs TRL's chunked divergence kernel
(the one its loss uses), so no `[positions, vocabulary]` tensor is built, under ZeRO-3 too (the
kernel gathers sharded heads). Used for the training metric and by `openkd eval`.
"""

from __future__ import annotations

from typing import Any

import torch


def logit_scale(config: Any) -> float:
    """The multiplier a model applies to its logits (as TRL's DistillationTrainer reads it)."""
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        value = getattr(config, name, None)
        if value is not None:
            return float(value)
    scaling = getattr(config, "logits_scaling", None)
    if scaling is not None:
        return float(scaling) if config.model_type == "hyperclovax" else 1.0 / float(scaling)
    return 1.0


def reverse_kl_sum(
    student_hidden: torch.Tensor,
    student_model: Any,
    teacher_hidden: torch.Tensor,
    teacher_model: Any,
    mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over the masked positions of KL(student || teacher), number of positions).

    `*_hidden` are `[batch, positions, hidden]` final hidden states aligned with `mask`
    (`[batch, positions]`, 1 where a sampled token is scored); `*_model` are the unwrapped
    causal LMs whose output embeddings project them.
    """
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    with torch.no_grad():
        s_head, t_head = (
            student_model.get_output_embeddings(),
            teacher_model.get_output_embeddings(),
        )
        valid = mask.reshape(-1).to(student_hidden.device) != 0
        count = valid.sum()
        if not int(count):
            return torch.zeros((), device=student_hidden.device), count
        h_s = student_hidden.detach().reshape(-1, student_hidden.size(-1))[valid]
        h_t = teacher_hidden.detach().reshape(-1, teacher_hidden.size(-1))[
            valid.to(teacher_hidden.device)
        ]
        s_cfg = student_model.config.get_text_config()
        t_cfg = teacher_model.config.get_text_config()
        divergence, _ = ChunkedDivergenceFunction.apply(
            h_s,
            s_head.weight,
            s_head.bias,
            h_t.to(h_s.device),
            t_head.weight,
            t_head.bias,
            1.0,  # beta 1: KL(student || teacher)
            1.0,
            logit_scale(s_cfg),
            getattr(s_cfg, "final_logit_softcapping", None),
            logit_scale(t_cfg),
            getattr(t_cfg, "final_logit_softcapping", None),
        )
        return divergence.sum(), count


def top1_tail_reverse_kl_sum(
    student_log_probs: torch.Tensor, teacher_actual: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over scored positions of the reverse KL on {sampled token, the rest}, positions).

    What a served teacher allows (it returns the sampled token's log-probability, not the whole
    distribution) and what TRL's server loss minimises with beta 1: KL(student || teacher)
    between the two-bucket distributions (p(x), 1 - p(x)) of the sampled token x. A lower bound
    of the exact reverse KL (the data-processing inequality), equal where both put their mass
    on x. `student_log_probs` `[batch, positions, vocabulary]`; `teacher_actual` `[batch,
    positions]` the teacher's log p(x); `labels` `[batch, positions]` x, -100 where unscored.
    """
    with torch.no_grad():
        scored = labels != -100
        count = scored.sum()
        if not int(count):
            return torch.zeros((), device=student_log_probs.device), count
        tokens = labels.clamp_min(0).unsqueeze(-1)
        s = student_log_probs.detach().float().gather(-1, tokens).squeeze(-1)[scored]
        t = teacher_actual.to(s.device).float()[scored]
        s, t = s.clamp(max=-1e-7), t.clamp(max=-1e-7)  # keep the tail bucket's mass positive
        s_rest, t_rest = torch.log(-torch.expm1(s)), torch.log(-torch.expm1(t))
        kl = s.exp() * (s - t) + s_rest.exp() * (s_rest - t_rest)
        # Each position's KL is >= 0; where student and teacher agree to float precision the
        # two terms cancel to a rounding error of either sign, which must not sum below zero.
        return kl.clamp_min(0).sum(), count
