"""Teacher-student KL and top-1 agreement on held-out rows with stored top-K log-probabilities."""

from __future__ import annotations

import pytest

from openkd.data.jsonl import iter_jsonl
from openkd.data.logprobs import SidecarReader
from openkd.eval.kl import teacher_student_kl
from tests.soft_helpers import sharper_copy, write_teacher_logprobs
from tests.train_helpers import write_reverse_dataset


@pytest.fixture(scope="module")
def held_out(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("kl")
    teacher = sharper_copy(tiny_model, root / "teacher", 6.0)
    data = write_reverse_dataset(root / "teacher.eval.jsonl", rows=12)
    sidecar = write_teacher_logprobs(teacher, data, k=6, batch_size=5, rows_per_commit=4)
    assert sidecar == root / "teacher.logprobs"  # the eval file shares its output's sidecar
    rows = [row for _, row in iter_jsonl(data)]
    return teacher, rows, SidecarReader(sidecar)


def naive(model, tokenizer, rows, reader):
    """Per row, full logits of the whole sequence, probability space, float64."""
    import torch

    kl_sum, agree, positions = 0.0, 0, 0
    for row in rows:
        stored = reader.get(row["id"])
        prompt = tokenizer.apply_chat_template(
            row["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        ids = torch.tensor([list(prompt) + stored.token_ids.tolist()])
        with torch.inference_mode():
            logits = model(ids).logits[0].double()
        q = torch.softmax(logits[len(prompt) - 1 : -1], -1)
        p = torch.from_numpy(stored.top_logprobs).double().exp()
        top = torch.tensor(stored.top_ids.tolist())
        for t in range(len(stored.token_ids)):
            q_top = q[t, top[t]]
            big_q = torch.cat([q_top, (1 - q_top.sum()).reshape(1)])
            big_p = torch.cat([p[t], (1 - p[t].sum()).clamp(min=1e-6).reshape(1)])
            big_p = big_p / big_p.sum()
            kl_sum += float((torch.xlogy(big_p, big_p) - big_p * big_q.log()).sum())
            agree += int(int(q[t].argmax()) == int(top[t][p[t].argmax()]))
            positions += 1
    return kl_sum / positions, agree / positions, positions


def test_a_student_scored_against_itself_has_zero_kl_and_full_agreement(held_out):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher, rows, reader = held_out
    model = AutoModelForCausalLM.from_pretrained(teacher)
    report = teacher_student_kl(model, AutoTokenizer.from_pretrained(teacher), rows, reader)
    assert report.rows == 12 and report.missing == 0
    assert report.positions == sum(len(reader.get(r["id"]).token_ids) for r in rows)
    assert report.kl == pytest.approx(0.0, abs=2e-3)  # float16 storage only
    assert report.top1_agreement == 1.0


def test_kl_and_agreement_match_a_naive_reference(held_out, tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, rows, reader = held_out
    student = AutoModelForCausalLM.from_pretrained(tiny_model)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    missing = {**rows[0], "id": "not-in-the-sidecar"}
    report = teacher_student_kl(student, tokenizer, [*rows, missing], reader, batch_size=5, chunk=7)
    kl, agree, positions = naive(student, tokenizer, rows, reader)
    assert report.missing == 1 and report.rows == 12 and report.positions == positions
    assert report.kl == pytest.approx(kl, rel=1e-4) and report.kl > 0.05
    assert report.top1_agreement == pytest.approx(agree)
    assert report.as_dict()["rows_without_logprobs"] == 1
