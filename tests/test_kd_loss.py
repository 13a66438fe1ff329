"""The soft-label loss against a naive full-vocabulary reference written independently.

The reference works in probability space, in float64, position by position: the student's
softmax over the whole vocabulary, its top-K probabilities and rest mass, both bucket vectors
raised to 1/T and normalised. openkd's loss works on logits, in chunks, with its gradients
computed in the forward; the two must agree in value and gradient.
"""

from __future__ import annotations

import math

import pytest

V, H, K, N = 50, 12, 5, 23


def naive_loss(hidden, weight, bias, labels, top_ids, top_lp, has, alpha, temperature, cap=None):
    """Sum over positions of alpha*CE + (1-alpha)*T^2*KL(P_T || Q_T), CE alone without teacher."""
    import torch

    logits = hidden @ weight.T + (bias if bias is not None else 0)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    q = torch.softmax(logits, -1)
    total = torch.zeros((), dtype=torch.float64)
    for n in range(hidden.shape[0]):
        ce = -torch.log(q[n, labels[n]])
        if not has[n]:
            total = total + ce
            continue
        q_top = q[n, top_ids[n]]
        q_bucket = torch.cat([q_top, (1 - q_top.sum()).reshape(1)])
        p_top = top_lp[n].double().exp()
        p_bucket = torch.cat([p_top, (1 - p_top.sum()).clamp(min=1e-6).reshape(1)])
        big_p = p_bucket ** (1 / temperature)
        big_p = big_p / big_p.sum()
        big_q = q_bucket ** (1 / temperature)
        big_q = big_q / big_q.sum()
        kl = (torch.xlogy(big_p, big_p) - big_p * big_q.log()).sum()
        total = total + alpha * ce + (1 - alpha) * temperature**2 * kl
    return total


def case(seed: int = 0, bias: bool = True, sharp: float = 3.0):
    import torch

    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.7
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    labels = torch.randint(0, V, (N,), generator=g)
    teacher_logits = torch.randn(N, V, generator=g, dtype=torch.float64) * sharp
    top = torch.log_softmax(teacher_logits, -1).topk(K, -1)
    has = torch.rand(N, generator=g) > 0.2
    return hidden, weight, b, labels, top.indices, top.values, has


def grads_of(fn, *tensors):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in tensors]
    loss = fn(*leaves)
    loss.backward()
    return loss.detach(), [t.grad if t is not None else None for t in leaves]


@pytest.mark.parametrize(
    "alpha,temperature", [(1.0, 1.0), (0.0, 1.0), (0.5, 1.0), (0.0, 2.0), (0.3, 0.7)]
)
def test_loss_and_gradients_match_the_naive_reference(alpha, temperature):
    import torch

    from openkd.distill.kd import chunked_kd_loss

    hidden, weight, bias, labels, top_ids, top_lp, has = case()

    def ours(h, w, b):
        return chunked_kd_loss(
            h, w, b, labels, top_ids, top_lp, has, alpha=alpha, temperature=temperature, chunk=4
        ).loss

    def reference(h, w, b):
        return naive_loss(h, w, b, labels, top_ids, top_lp, has, alpha, temperature)

    loss, grads = grads_of(ours, hidden, weight, bias)
    ref_loss, ref_grads = grads_of(reference, hidden, weight, bias)
    assert torch.allclose(loss, ref_loss, rtol=1e-10, atol=1e-10), (loss, ref_loss)
    for got, want in zip(grads, ref_grads, strict=True):
        assert torch.allclose(got, want, rtol=1e-8, atol=1e-10)


def test_chunks_give_the_unchunked_value_and_gradients_in_float32():
    import torch

    from openkd.distill.kd import chunked_kd_loss

    hidden, weight, bias, labels, top_ids, top_lp, has = (
        t.float() if t is not None and t.is_floating_point() else t for t in case(seed=3)
    )
    results = []
    for chunk in (1, 5, N):
        results.append(
            grads_of(
                lambda h, w, b, c=chunk: (
                    chunked_kd_loss(
                        h, w, b, labels, top_ids, top_lp, has, alpha=0.5, temperature=1.5, chunk=c
                    ).loss
                ),
                hidden,
                weight,
                bias,
            )
        )
    (loss, grads), others = results[0], results[1:]
    for other_loss, other_grads in others:
        assert torch.allclose(loss, other_loss, rtol=1e-5)
        for a, b in zip(grads, other_grads, strict=True):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_rest_bucket_is_matched_and_the_top_k_is_not_renormalised():
    """Teacher top-2 = 0.5, 0.2 (rest 0.3). A student with the same buckets has KL 0, however
    it spreads its rest; one that renormalised the top-2 (0.714, 0.286) does not."""
    import torch

    from openkd.distill.kd import kd_terms

    teacher = torch.tensor([[math.log(0.5), math.log(0.2)]], dtype=torch.float64)
    top_ids = torch.tensor([[0, 1]])

    def student(probs):
        return torch.tensor([probs], dtype=torch.float64).log()

    spread = student([0.5, 0.2, 0.1, 0.1, 0.1])
    lumped = student([0.5, 0.2, 0.3 - 2e-9, 1e-9, 1e-9])
    renormalised = student([5 / 7 - 1e-9, 2 / 7 - 1e-9, 1e-9, 1e-9])
    labels = torch.tensor([0])
    for logits in (spread, lumped):
        for temperature in (1.0, 2.0, 0.5):
            kl = kd_terms(logits, labels, top_ids, teacher, temperature).kl
            assert abs(float(kl)) < 1e-8, (logits, temperature, kl)
    kl = float(kd_terms(renormalised, labels, top_ids, teacher).kl)
    expected = (
        0.5 * math.log(0.5 / (5 / 7)) + 0.2 * math.log(0.2 / (2 / 7)) + 0.3 * math.log(0.3 / 2e-9)
    )
    assert kl == pytest.approx(expected, rel=1e-6)


def test_temperature_softens_both_sides_the_same_way():
    import torch

    from openkd.distill.kd import student_log_buckets, teacher_log_buckets

    teacher = torch.log(torch.tensor([[0.6, 0.3]], dtype=torch.float64))  # rest 0.1
    log_p = teacher_log_buckets(teacher, 2.0)
    raw = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64).sqrt()
    assert torch.allclose(log_p.exp()[0], raw / raw.sum())
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]], dtype=torch.float64)
    q = torch.softmax(logits, -1)[0]
    log_q = student_log_buckets(logits, torch.tensor([[0, 1]]), 2.0)
    raw = torch.stack([q[0], q[1], q[2] + q[3]]).sqrt()
    assert torch.allclose(log_q.exp()[0], raw / raw.sum())


def test_sums_and_agreement_and_positions_without_teacher():
    import torch

    from openkd.distill.kd import chunked_kd_loss, kd_terms

    hidden, weight, bias, labels, top_ids, top_lp, has = case(seed=5)
    with torch.no_grad():
        sums = chunked_kd_loss(
            hidden, weight, bias, labels, top_ids, top_lp, has, alpha=0.0, chunk=7
        )
        logits = hidden @ weight.T + bias
        terms = kd_terms(logits, labels, top_ids, top_lp)
    assert float(sums.teacher_positions) == int(has.sum())
    assert float(sums.kl) == pytest.approx(float(terms.kl[has].sum()))
    assert float(sums.ce) == pytest.approx(float(terms.ce.sum()))
    # soft: the teacher's positions carry KL only, the others CE only
    assert float(sums.loss) == pytest.approx(float(terms.kl[has].sum() + terms.ce[~has].sum()))
    teacher_top = top_ids.gather(-1, top_lp.argmax(-1, keepdim=True)).squeeze(-1)
    agree = (logits.argmax(-1) == teacher_top)[has].sum()
    assert float(sums.agree) == int(agree)
    assert float(sums.correct) == int((logits.argmax(-1) == labels).sum())


def test_softcap_transform_and_bad_teacher_values_are_handled():
    import torch

    from openkd.distill.kd import LogitTransform, chunked_kd_loss

    hidden, weight, bias, labels, top_ids, top_lp, has = case(seed=7)
    top_lp = top_lp.clone()
    top_lp[0, -1] = float("-inf")  # a teacher that gave a token zero probability
    top_lp[1, -1] = float("nan")
    loss = chunked_kd_loss(
        hidden, weight, bias, labels, top_ids, top_lp, has, alpha=0.4, chunk=6,
        transform=LogitTransform(softcap=5.0),
    ).loss  # fmt: skip
    clean = torch.nan_to_num(top_lp, nan=-1e4, neginf=-1e4)
    ref = naive_loss(hidden, weight, bias, labels, top_ids, clean, has, 0.4, 1.0, cap=5.0)
    assert torch.isfinite(loss) and torch.allclose(loss, ref, rtol=1e-9)


def test_chunk_size_keeps_a_chunk_of_logits_bounded():
    from openkd.distill.kd import chunk_positions

    assert chunk_positions(151_936) == (1 << 25) // 151_936
    assert chunk_positions(10**9) == 1


def test_kd_head_on_a_model_matches_full_logits_in_value_and_weight_gradients(tiny_model):
    """The patched forward (backbone + chunked LM head) against the model's own full logits."""
    import torch
    from transformers import AutoModelForCausalLM

    from openkd.distill.kd import add_kd_head, kd_terms

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float64)
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (2, 9))
    labels = ids.clone()
    labels[:, :4] = -100
    labels[1, 8] = -100  # padding
    teacher_logits = torch.randn(2, 9, vocab, dtype=torch.float64) * 4
    top = torch.log_softmax(teacher_logits, -1).topk(6, -1)
    mask = labels != -100
    mask[0, 8] = False  # an appended EOS: no teacher data, CE only

    # reference: full logits from the untouched model
    out = model(input_ids=ids)
    logits = out.logits[:, :-1]
    shifted = labels[:, 1:]
    keep = shifted != -100
    terms = kd_terms(
        logits[keep], shifted[keep], top.indices[:, 1:][keep], top.values[:, 1:][keep], 2.0
    )
    has = mask[:, 1:][keep]
    per = torch.where(has, 0.25 * terms.ce + 0.75 * 4.0 * terms.kl, terms.ce)
    reference = per.sum() / keep.sum()
    reference.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    add_kd_head(model, alpha=0.25, temperature=2.0, chunk=3)
    got = model(
        input_ids=ids, labels=labels, teacher_ids=top.indices, teacher_logprobs=top.values,
        teacher_mask=mask,
    )  # fmt: skip
    got.loss.backward()
    assert torch.allclose(got.loss, reference, rtol=1e-10)
    assert int(got.positions) == int(keep.sum())
    for name, param in model.named_parameters():
        assert torch.allclose(param.grad, want[name], rtol=1e-7, atol=1e-12), name
    # without teacher data the model is the original one
    plain = model(input_ids=ids)
    assert plain.logits.shape == (2, 9, vocab)
