"""The soft-label loss: the student against the teacher's stored top-K log-probabilities.

At each completion position the teacher's stored top-K (ids k_1..k_K, raw temperature-1
log-probabilities l_1..l_K) describes K + 1 buckets: the K tokens, with probabilities
p_i = exp(l_i), and one "rest" bucket holding the mass the teacher put anywhere else,
r = 1 - sum_i p_i. The student's distribution is read in the same buckets: its probabilities
of the same K ids, and its total probability of every other token of its vocabulary. Then

    loss = alpha * CE(label) + (1 - alpha) * T^2 * KL(teacher buckets || student buckets)

summed over the completion positions and divided by their number (TRL's reduction). `--loss
hard` is alpha 1 (TRL's own loss, untouched), `--loss soft` alpha 0, `--loss mix` `--kd-alpha`.
A completion position with no teacher data (the end-of-turn token openkd appends when the
teacher's ids do not end with it) carries the cross-entropy alone, with weight 1, so even a
soft-only student learns to stop.

Why the rest bucket, and why the top-K is not renormalised: renormalising the teacher's top-K
to sum to 1 says the teacher gave zero probability to every other token, so the loss pushes
the student to put all its mass on those K tokens: a student more confident than its teacher
(on a token where the teacher's top-20 holds 60 %, the student is taught 100 %). Matching the
rest bucket keeps the teacher's uncertainty: the student is taught to leave 40 % outside the
K tokens, spread as it likes.

Temperature. The student's logits are divided by T; the teacher's stored log-probabilities
are divided by T too, the rest bucket entering both sides as one bucket whose logit is the
log of its mass (for the student, the logsumexp of its logits over the other V - K tokens),
and each side is normalised over its K + 1 buckets. Tempering the teacher exactly would need
sum_v p_v^(1/T) over the tokens it did not store, which could be anything from r^(1/T) (all
the rest on one token) to (V - K)^(1 - 1/T) * r^(1/T) (spread evenly): unknowable. Pooling the
rest into one bucket on both sides keeps the minimum of the loss where the student's T = 1
buckets equal the teacher's, at every T (x -> x^(1/T), normalised, is one-to-one on the
simplex): the temperature changes how the loss weighs the buckets, never what it teaches.
At T = 1 it is exactly the KL above. T^2 keeps the gradient's scale comparable across T.

Memory. The student's logits are never built for the whole batch: the final hidden states of
the loss positions go through the LM head a chunk of positions at a time (`chunk_positions`,
sized so a chunk's logits hold about 2^25 values), each chunk's loss and its gradients with
respect to the hidden states and the LM head weight are computed at once, in the forward, and
the chunk's logits are freed. The backward only scales the stored gradients (a [N, H] and a
[V, H] buffer, float32). Under DeepSpeed ZeRO-3 the LM head weight is gathered for the loss
(`trl.trainer.utils.maybe_gather_lm_head_ctx`), which is why the loss runs inside the model's
forward (`add_kd_head`): ZeRO-3's hooks must be armed for the weight's gradient.
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers.utils import ModelOutput

# The teacher's rest mass is at least this (fp16 log-probabilities can sum to slightly over 1).
REST_FLOOR = 1e-6
# Stored log-probabilities below this (or -inf, or NaN) are taken as this: probability 0.
LOGPROB_FLOOR = -1e4
# Values in one chunk's student logits [positions, vocabulary].
CHUNK_ELEMENTS = 1 << 25


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """float32 for the loss arithmetic (float64 kept: the tests' reference runs in it)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def chunk_positions(vocab_size: int, elements: int = CHUNK_ELEMENTS) -> int:
    """Positions per chunk so that a chunk's logits hold about `elements` values."""
    return max(1, elements // max(1, vocab_size))


def teacher_log_buckets(top_logprobs: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log P over the K + 1 buckets [N, K + 1] from the stored T=1 log-probabilities [N, K]."""
    logprobs = torch.nan_to_num(_upcast(top_logprobs), nan=LOGPROB_FLOOR).clamp(min=LOGPROB_FLOOR)
    rest = (1.0 - logprobs.exp().sum(-1)).clamp(min=REST_FLOOR).log()
    return F.log_softmax(torch.cat([logprobs, rest[:, None]], -1) / temperature, dim=-1)


def student_log_buckets(
    logits: torch.Tensor,
    top_ids: torch.Tensor,
    temperature: float = 1.0,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """log Q over the K + 1 buckets [N, K + 1] from the student's logits [N, V].

    The rest bucket's logit is the logsumexp over the V - K other tokens, computed with those
    K masked out (exact and stable, unlike log(1 - top mass) when the top mass is near 1).
    `valid` [N, K] (cross-tokenizer targets, fewer than K ids): a padding slot repeats a valid
    id of its row and is an empty bucket (logit LOGPROB_FLOOR, as the teacher's padding).
    """
    top = logits.gather(-1, top_ids)
    if valid is not None:
        top = torch.where(valid, top, torch.full_like(top, LOGPROB_FLOOR))
    masked = logits.scatter(-1, top_ids, float("-inf"))
    rest = torch.logsumexp(masked, dim=-1, keepdim=True)
    return F.log_softmax(torch.cat([top, rest], -1) / temperature, dim=-1)


@dataclass
class Terms:
    """Per-position quantities of one chunk."""

    ce: torch.Tensor  # [N] hard-label cross-entropy at T = 1
    kl: torch.Tensor  # [N] KL(teacher || student) over the K + 1 buckets at temperature T
    # (ULD's sorted-probability L1 where the position's target is ULD: cross-tokenizer)
    student_top1: torch.Tensor  # [N] the student's most likely token


def kd_terms(
    logits: torch.Tensor,
    labels: torch.Tensor,
    top_ids: torch.Tensor,
    top_logprobs: torch.Tensor,
    temperature: float = 1.0,
    valid: torch.Tensor | None = None,
    uld: torch.Tensor | None = None,
) -> Terms:
    """Cross-entropy and bucket KL for every position of `logits` [N, V] (float32 inside).

    `valid` [N, K]: which of the K slots hold a target (cross-tokenizer); `uld` [N]: positions
    whose target is ULD's (`uld_distance`) instead of the KL.
    """
    logits = _upcast(logits)
    ce = torch.logsumexp(logits, -1) - logits.gather(-1, labels[:, None]).squeeze(-1)
    log_p = teacher_log_buckets(top_logprobs, temperature)
    log_q = student_log_buckets(logits, top_ids, temperature, valid)
    log_p = log_p.to(torch.promote_types(log_p.dtype, log_q.dtype))
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    if uld is not None and bool(uld.any()):
        kl = torch.where(uld, uld_distance(logits, log_p, temperature), kl)
    return Terms(ce=ce, kl=kl, student_top1=logits.argmax(-1))


def uld_distance(logits: torch.Tensor, log_p: torch.Tensor, temperature: float) -> torch.Tensor:
    """ULD (Boizard et al. 2024): L1 between sorted probability vectors, no shared ids needed.

    The teacher's K + 1 buckets (`log_p`) against the student's own top K + rest, each sorted
    descending: a bound on the Wasserstein-1 distance between the two distributions.
    """
    k = log_p.shape[-1] - 1
    top = logits.topk(k, dim=-1)
    rest = torch.logsumexp(logits.scatter(-1, top.indices, float("-inf")), -1, keepdim=True)
    q = F.softmax(torch.cat([top.values, rest], -1) / temperature, dim=-1)
    p = log_p.exp()
    return (q.sort(-1, descending=True).values - p.sort(-1, descending=True).values).abs().sum(-1)


def position_loss(
    terms: Terms, has_teacher: torch.Tensor, alpha: float, temperature: float
) -> torch.Tensor:
    """alpha * CE + (1 - alpha) * T^2 * KL where the teacher's data exists, CE alone elsewhere."""
    soft = (1.0 - alpha) * temperature**2
    with_teacher = alpha * terms.ce + soft * terms.kl
    return torch.where(has_teacher, with_teacher, terms.ce)


def teacher_top1(top_ids: torch.Tensor, top_logprobs: torch.Tensor) -> torch.Tensor:
    """The teacher's most likely token at each position (its stored top-K need not be sorted)."""
    return top_ids.gather(-1, top_logprobs.argmax(-1, keepdim=True)).squeeze(-1)


@dataclass(frozen=True)
class LogitTransform:
    """What a model does to `hidden @ lm_head.T` before its softmax (Gemma's softcap, scales)."""

    scale: float = 1.0
    softcap: float | None = None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def logit_transform(config: Any) -> LogitTransform:
    """The scale and softcap a transformers text config applies to its logits."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = getattr(text, "logit_scale", None)
    for name in ("output_multiplier", "lm_head_multiplier"):
        if scale is None:
            scale = getattr(text, name, None)
    if scale is None and getattr(text, "logits_scaling", None) is not None:
        scaling = text.logits_scaling
        scale = scaling if getattr(text, "model_type", "") == "hyperclovax" else 1 / scaling
    return LogitTransform(
        scale=1.0 if scale is None else float(scale),
        softcap=getattr(text, "final_logit_softcapping", None),
    )


@dataclass
class KDSums:
    """Sums over the positions of one call; `loss` carries the gradient."""

    loss: torch.Tensor
    ce: torch.Tensor  # summed cross-entropy (all positions)
    kl: torch.Tensor  # summed KL (positions with teacher data)
    teacher_positions: torch.Tensor
    agree: torch.Tensor  # student argmax == teacher argmax (positions with teacher data)
    correct: torch.Tensor  # student argmax == label (all positions)


def _chunk_terms(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    top_ids: torch.Tensor,
    top_logprobs: torch.Tensor,
    has_teacher: torch.Tensor,
    alpha: float,
    temperature: float,
    transform: LogitTransform,
    valid: torch.Tensor | None = None,
    uld: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Terms]:
    logits = transform(F.linear(hidden, weight, bias))
    terms = kd_terms(logits, labels, top_ids, top_logprobs, temperature, valid, uld)
    return position_loss(terms, has_teacher, alpha, temperature).sum(), terms


class _ChunkedKD(torch.autograd.Function):
    """Summed KD loss of hidden states [N, H] through an LM head, a chunk of positions at a time.

    Gradients for the hidden states, weight and bias are computed chunk by chunk in the
    forward (torch.autograd.grad on the chunk) and only scaled in the backward.
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        labels: torch.Tensor,
        top_ids: torch.Tensor,
        top_logprobs: torch.Tensor,
        has_teacher: torch.Tensor,
        alpha: float,
        temperature: float,
        chunk: int,
        transform: LogitTransform,
        needs: tuple[bool, bool, bool],
        valid: torch.Tensor | None,
        uld: torch.Tensor | None,
    ) -> tuple[torch.Tensor, ...]:
        need_h, need_w, need_b = needs
        device = hidden.device

        def buffer(like: torch.Tensor) -> torch.Tensor:  # float32 at least, float64 kept
            dtype = torch.promote_types(like.dtype, torch.float32)
            return torch.zeros(like.shape, dtype=dtype, device=device)

        grad_h: Any = buffer(hidden) if need_h else None
        grad_w: Any = buffer(weight) if need_w else None
        grad_b: Any = buffer(bias) if need_b and bias is not None else None
        sums = torch.zeros(6, dtype=torch.float64, device=device)
        top1_teacher = teacher_top1(top_ids, top_logprobs)
        w = weight.detach().requires_grad_(need_w)
        b = bias.detach().requires_grad_(need_b) if bias is not None else None
        for start in range(0, hidden.shape[0], chunk):
            end = min(start + chunk, hidden.shape[0])
            with torch.enable_grad() if any(needs) else torch.no_grad():
                h = hidden[start:end].detach().requires_grad_(need_h)
                loss, terms = _chunk_terms(
                    h, w, b, labels[start:end], top_ids[start:end], top_logprobs[start:end],
                    has_teacher[start:end], alpha, temperature, transform,
                    None if valid is None else valid[start:end],
                    None if uld is None else uld[start:end],
                )  # fmt: skip
                wanted: list[Any] = [
                    t for t, need in ((h, need_h), (w, need_w), (b, need_b)) if need
                ]
                grads = list(torch.autograd.grad(loss, wanted)) if wanted else []
            if need_h:
                grad_h[start:end] = grads.pop(0)
            if need_w:
                grad_w += grads.pop(0)
            if need_b and grad_b is not None:
                grad_b += grads.pop(0)
            has = has_teacher[start:end]
            if uld is not None:  # KL and agreement: positions whose target names ids
                has = has & ~uld[start:end]
            sums += torch.stack(
                [
                    loss.detach().double(),
                    terms.ce.detach().double().sum(),
                    terms.kl.detach().double()[has].sum(),
                    has.sum().double(),
                    (terms.student_top1 == top1_teacher[start:end])[has].sum().double(),
                    (terms.student_top1 == labels[start:end]).sum().double(),
                ]
            )
        ctx.save_for_backward(
            *(g if g is not None else torch.empty(0) for g in (grad_h, grad_w, grad_b))
        )
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        ctx.needs = (need_h, need_w, need_b and bias is not None)
        loss_sum = sums[0].to(torch.promote_types(hidden.dtype, torch.float32))
        stats = sums[1:]
        ctx.mark_non_differentiable(stats)
        return loss_sum, stats

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, _grad_stats: Any) -> tuple[Any, ...]:
        grad_h, grad_w, grad_b = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs
        dtype_h, dtype_w, dtype_b = ctx.dtypes
        scale = grad_loss
        return (
            (grad_h * scale).to(dtype_h) if need_h else None,
            (grad_w * scale).to(dtype_w) if need_w else None,
            (grad_b * scale).to(dtype_b) if need_b else None,
            *([None] * 11),
        )


def chunked_kd_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    top_ids: torch.Tensor,
    top_logprobs: torch.Tensor,
    has_teacher: torch.Tensor,
    *,
    alpha: float,
    temperature: float = 1.0,
    chunk: int | None = None,
    transform: LogitTransform | None = None,
    valid: torch.Tensor | None = None,
    uld: torch.Tensor | None = None,
) -> KDSums:
    """The summed loss of positions `hidden` [N, H] (labels [N], teacher [N, K], has [N]).

    `valid` [N, K] and `uld` [N]: cross-tokenizer targets (`kd_terms`).
    """
    grad_on = torch.is_grad_enabled()
    needs = (
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    )
    loss, stats = _ChunkedKD.apply(
        hidden, weight, bias, labels, top_ids.long(), top_logprobs, has_teacher.bool(), alpha,
        temperature, chunk or chunk_positions(weight.shape[0]), transform or LogitTransform(),
        needs, None if valid is None else valid.bool(), None if uld is None else uld.bool(),
    )  # fmt: skip
    return KDSums(
        loss=loss,
        ce=stats[0],
        kl=stats[1],
        teacher_positions=stats[2],
        agree=stats[3],
        correct=stats[4],
    )


@dataclass
class KDOutput(ModelOutput):
    """What a model patched by `add_kd_head` returns when called with teacher data."""

    loss: torch.Tensor | None = None
    ce_sum: torch.Tensor | None = None
    kl_sum: torch.Tensor | None = None
    teacher_positions: torch.Tensor | None = None
    agree: torch.Tensor | None = None
    correct: torch.Tensor | None = None
    positions: torch.Tensor | None = None


def add_kd_head(model: Any, *, alpha: float, temperature: float, chunk: int | None = None) -> None:
    """Let `model(..., teacher_ids=, teacher_logprobs=, teacher_mask=, labels=)` return the KD loss.

    The backbone runs as usual; the LM head is applied by `chunked_kd_loss` to the positions
    whose next-token label is not -100. `teacher_*` are aligned with `labels` ([B, L, K] and
    [B, L]): position j holds the teacher's distribution for token j. Called without
    `teacher_ids` the model is unchanged (generation, TRL's own loss). Patch the transformers
    model itself (under PEFT: `get_base_model()`), after TRL's own patch.
    """
    original_forward = model.forward
    transform = logit_transform(model.config)

    @functools.wraps(type(model).forward)
    def forward(
        self: Any,
        *args: Any,
        teacher_ids: torch.Tensor | None = None,
        teacher_logprobs: torch.Tensor | None = None,
        teacher_mask: torch.Tensor | None = None,
        teacher_valid: torch.Tensor | None = None,
        teacher_uld: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        num_items_in_batch: Any = None,
        **kwargs: Any,
    ) -> Any:
        if teacher_ids is None:
            if labels is not None:
                kwargs["labels"] = labels
            if num_items_in_batch is not None:
                kwargs["num_items_in_batch"] = num_items_in_batch
            return original_forward(*args, **kwargs)
        from trl.trainer.utils import maybe_gather_lm_head_ctx

        if labels is None or teacher_logprobs is None or teacher_mask is None:
            raise ValueError("the KD forward needs labels, teacher_logprobs and teacher_mask")
        kwargs["use_cache"] = False
        kwargs.pop("return_dict", None)
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        lm_head = self.get_output_embeddings()
        shifted = labels[:, 1:].to(lm_head.weight.device)
        mask = shifted != -100
        with maybe_gather_lm_head_ctx(lm_head.weight, lm_head.bias):
            sums = chunked_kd_loss(
                hidden.to(lm_head.weight.device)[mask],
                lm_head.weight,
                lm_head.bias,
                shifted[mask],
                teacher_ids[:, 1:].to(shifted.device)[mask],
                teacher_logprobs[:, 1:].to(shifted.device)[mask],
                teacher_mask[:, 1:].to(shifted.device)[mask],
                alpha=alpha,
                temperature=temperature,
                chunk=chunk,
                transform=transform,
                valid=None
                if teacher_valid is None
                else teacher_valid[:, 1:].to(shifted.device)[mask],
                uld=None if teacher_uld is None else teacher_uld[:, 1:].to(shifted.device)[mask],
            )
        positions = mask.sum()
        denominator = positions.clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return KDOutput(
            loss=sums.loss / denominator,
            ce_sum=sums.ce,
            kl_sum=sums.kl,
            teacher_positions=sums.teacher_positions,
            agree=sums.agree,
            correct=sums.correct,
            positions=positions,
        )

    model.forward = types.MethodType(forward, model)
