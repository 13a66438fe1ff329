"""The student's per-token reverse KL to a teacher on the student's own sampled answers.

The quantity `openkd train --loss on-policy` minimises: the student samples an answer to each
held-out prompt (temperature 1 by default, top-p 1, no top-k, up to `max_new_tokens`, cut after
its first EOS, which is scored too), and at every sampled position
KL(student || teacher) = sum_v p_s(v) (log p_s(v) - log p_t(v)) is computed exactly over the
whole vocabulary from both models' final hidden states (`openkd.distill.divergence`).
The mean is over sampled tokens, not answers. Both models run in this process (transformers);
they must share the student's tokenizer (the same check as training). `openkd eval
--on-policy-teacher MODEL` reports it for the student and `--base` (`score`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class OnPolicyKL:
    prompts: int
    samples: int  # answers sampled (prompts x samples per prompt)
    tokens: int  # sampled tokens scored
    reverse_kl: float | None  # mean KL(student || teacher) per sampled token, nats
    stop_rate: float  # share of samples that ended with EOS
    temperature: float
    seed: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "prompts": self.prompts,
            "samples": self.samples,
            "tokens": self.tokens,
            "reverse_kl": self.reverse_kl,
            "stop_rate": self.stop_rate,
            "temperature": self.temperature,
            "seed": self.seed,
        }


def _hidden(model: Any, input_ids: Any, attention_mask: Any, keep: int) -> Any:
    """Final hidden states predicting the last `keep` tokens: `[batch, keep, hidden]`."""
    from peft import PeftModel

    base: Any = model.base_model.model if isinstance(model, PeftModel) else model
    out = base.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state[:, -keep - 1 : -1, :]


def sampled_reverse_kl(
    student: Any,
    teacher: Any,
    tokenizer: Any,
    prompts: Sequence[list[dict[str, str]]],
    *,
    max_new_tokens: int,
    eos_ids: Sequence[int],
    samples: int = 1,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
    client: Any = None,
) -> OnPolicyKL:
    """Sample from `student` on `prompts` and score every sampled token against `teacher`, or
    against a served teacher through `client` (`TeacherClient`; `teacher` unused): then the
    reverse KL is over the sampled token plus a tail bucket."""
    import torch

    from openkd.distill.divergence import reverse_kl_sum

    device = next(student.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    total = torch.zeros((), dtype=torch.float64)
    tokens = stopped = answers = 0
    expanded = [p for p in prompts for _ in range(samples)]
    try:
        for start in range(0, len(expanded), batch_size):
            batch = expanded[start : start + batch_size]
            encoded = tokenizer.apply_chat_template(
                batch, add_generation_prompt=True, tokenize=True, return_dict=True
            )
            ids = [torch.tensor(x) for x in encoded["input_ids"]]
            width = max(len(x) for x in ids)
            input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
            mask = torch.zeros((len(ids), width), dtype=torch.long)
            for row, x in enumerate(ids):  # left padding, as TRL samples
                input_ids[row, width - len(x) :] = x
                mask[row, width - len(x) :] = 1
            input_ids, mask = input_ids.to(device), mask.to(device)
            with torch.no_grad():
                out = student.generate(
                    input_ids=input_ids,
                    attention_mask=mask,
                    do_sample=True,
                    temperature=temperature,
                    top_p=1.0,
                    top_k=0,
                    max_new_tokens=max_new_tokens,
                    eos_token_id=list(eos_ids),
                    pad_token_id=pad,
                )
            completion = out[:, width:]
            is_eos = torch.isin(completion, torch.tensor(list(eos_ids), device=device))
            has_eos = is_eos.any(dim=1)
            first = torch.where(has_eos, is_eos.int().argmax(dim=1), completion.size(1))
            positions = torch.arange(completion.size(1), device=device)[None, :]
            scored = (positions <= first[:, None]) & (positions < completion.size(1))
            full = torch.cat([input_ids, completion], dim=1)
            full_mask = torch.cat([mask, scored.long()], dim=1)
            keep = completion.size(1)
            if client is not None:
                kl, count = _served_kl(student, client, full, full_mask, completion, scored)
            else:
                with torch.no_grad():
                    h_s = _hidden(student, full, full_mask, keep)
                    h_t = _hidden(
                        teacher, full.to(teacher.device), full_mask.to(teacher.device), keep
                    )
                kl, count = reverse_kl_sum(h_s, student, h_t, teacher, scored)
            total += kl.double().cpu()
            tokens += int(count)
            stopped += int(has_eos.sum())
            answers += len(batch)
    finally:
        torch.random.set_rng_state(generator_state)
    return OnPolicyKL(
        prompts=len(prompts),
        samples=answers,
        tokens=tokens,
        reverse_kl=float(total) / tokens if tokens else None,
        stop_rate=stopped / answers if answers else 0.0,
        temperature=temperature,
        seed=seed,
    )


def _served_kl(
    student: Any, client: Any, full: Any, full_mask: Any, completion: Any, scored: Any
) -> tuple[Any, Any]:
    """The top-1+tail reverse KL of a batch, the teacher's log-probabilities from its server
    (the request code of `openkd train --teacher-base-url`)."""
    import torch

    from openkd.distill.divergence import top1_tail_reverse_kl_sum
    from openkd.teacher.client import actual_logprobs

    keep = completion.size(1)
    with torch.no_grad():
        logits = student(input_ids=full, attention_mask=full_mask).logits[:, -keep - 1 : -1]
        log_probs = torch.log_softmax(logits.float(), dim=-1)
    sequences = [row[mask.bool()].tolist() for row, mask in zip(full, full_mask, strict=True)]
    answer_lengths = scored.sum(dim=1).tolist()
    prompts = [len(seq) - n for seq, n in zip(sequences, answer_lengths, strict=True)]
    teacher = torch.zeros(scored.shape, dtype=torch.float32)
    for row, values in enumerate(actual_logprobs(client, sequences, prompts, 1.0)):
        teacher[row, : len(values)] = torch.tensor(values, dtype=torch.float32)
    labels = torch.where(scored, completion, torch.full_like(completion, -100))
    return top1_tail_reverse_kl_sum(log_probs, teacher.to(log_probs.device), labels)


def score(
    cfg: Any, role: str, model_name: str, prompts: Sequence[Any], max_new_tokens: int
) -> dict:
    """`openkd eval --on-policy-teacher`: this model's reverse KL on its own samples."""
    from openkd import console
    from openkd.chat import as_id_list
    from openkd.generate.backends.transformers import load_causal_lm
    from openkd.system import free_memory
    from openkd.teacher.check import check_teacher

    teacher_name = cfg.on_policy_teacher
    served = cfg.on_policy_teacher_base_url
    console.info(
        f"{role}: reverse KL to {teacher_name} on its own samples ({cfg.on_policy_samples} per "
        f"prompt, temperature {cfg.on_policy_temperature:g}, transformers"
        + (f"; teacher served at {served}, top-1+tail estimate)" if served else ")")
    )
    model, tokenizer = load_causal_lm(
        model_name, trust_remote_code=cfg.trust_remote_code, dtype=cfg.dtype
    )
    teacher_model = None
    try:
        teacher = check_teacher(
            teacher_name, model_name, tokenizer, trust_remote_code=cfg.trust_remote_code
        )
        client = _client(cfg) if served else None
        if client is None:
            teacher_model, _ = load_causal_lm(
                teacher.path, trust_remote_code=cfg.trust_remote_code, dtype=cfg.dtype
            )
        eos = as_id_list(model.generation_config.eos_token_id) or []
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
            eos.append(tokenizer.eos_token_id)
        found = sampled_reverse_kl(
            model,
            teacher_model,
            tokenizer,
            prompts,
            max_new_tokens=max_new_tokens,
            eos_ids=eos,
            samples=cfg.on_policy_samples,
            temperature=cfg.on_policy_temperature,
            seed=cfg.seed,
            batch_size=cfg.nll_batch_size,
            client=client,
        )
    finally:
        del model, teacher_model
        free_memory()
    if served:
        return {
            "on_policy_reverse_kl_top1_tail": found.reverse_kl,
            "on_policy_tokens": found.tokens,
            "on_policy_stop_rate": found.stop_rate,
        }
    return {
        "on_policy_reverse_kl": found.reverse_kl,
        "on_policy_tokens": found.tokens,
        "on_policy_stop_rate": found.stop_rate,
    }


def _client(cfg: Any) -> Any:
    """The served teacher's client, checked as `openkd train` checks it (reachable, serving
    --on-policy-teacher)."""
    from openkd import console
    from openkd.teacher.client import TeacherClient
    from openkd.teacher.served import Endpoint, api_root, probe

    point = Endpoint(
        url=api_root(cfg.on_policy_teacher_base_url), label="--on-policy-teacher-base-url"
    )
    model, _, warnings = probe(point, cfg.on_policy_teacher)
    for warning in warnings:
        console.warn(warning)

    def on_failure(exc: BaseException) -> str:
        from openkd.errors import brief

        return (
            f"--on-policy-teacher-base-url: the teacher server at {point.url} stopped answering "
            f"({brief(exc)}); restart it and rerun"
        )

    return TeacherClient(point, model, on_failure=on_failure)
