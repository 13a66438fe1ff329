"""The per-token reverse KL to a teacher on a model's own samples: exact, and in `openkd eval`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import error_line, invoke
from tests.soft_helpers import sharper_copy, swap_two_tokens
from tests.train_helpers import write_reverse_dataset


@pytest.fixture(scope="module")
def teacher(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return sharper_copy(tiny_model, tmp_path_factory.mktemp("teacher") / "model", 4.0)


def _load(path: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_reverse_kl_sum_is_exact_over_the_vocabulary(tiny_model: Path, teacher: Path) -> None:
    import torch

    from openkd.distill.divergence import reverse_kl_sum

    student, teach = _load(tiny_model), _load(teacher)
    torch.manual_seed(0)
    h_s, h_t = torch.randn(2, 7, 128), torch.randn(2, 7, 128)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
    total, count = reverse_kl_sum(h_s, student, h_t, teach, mask)
    # naive: full logits, float64, KL(student || teacher) summed over the masked positions
    with torch.no_grad():
        ls = torch.log_softmax(student.lm_head(h_s).double(), -1)
        lt = torch.log_softmax(teach.lm_head(h_t).double(), -1)
    naive = ((ls.exp() * (ls - lt)).sum(-1) * mask).sum()
    assert int(count) == 12
    assert float(total) == pytest.approx(float(naive), rel=1e-4)


@pytest.mark.slow
def test_a_model_scored_against_itself_has_zero_reverse_kl(tiny_model: Path, teacher: Path) -> None:
    from transformers import AutoTokenizer

    from openkd.eval.on_policy import sampled_reverse_kl

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    student = _load(tiny_model)
    prompts = [[{"role": "user", "content": f"Reverse the words: a b {i}"}] for i in range(5)]
    kwargs = {"max_new_tokens": 8, "eos_ids": [tokenizer.eos_token_id], "samples": 2}
    same = sampled_reverse_kl(student, student, tokenizer, prompts, **kwargs)
    other = sampled_reverse_kl(student, _load(teacher), tokenizer, prompts, **kwargs)
    assert same.samples == other.samples == 10 and same.tokens > 0
    assert abs(same.reverse_kl) < 1e-4
    assert other.reverse_kl > 0.05
    # seeded: the same samples again
    again = sampled_reverse_kl(student, _load(teacher), tokenizer, prompts, **kwargs)
    assert again.reverse_kl == pytest.approx(other.reverse_kl) and again.tokens == other.tokens


@pytest.mark.slow
def test_eval_reports_the_on_policy_reverse_kl(
    tiny_model: Path, teacher: Path, tmp_path: Path
) -> None:
    data = write_reverse_dataset(tmp_path / "t.eval.jsonl", rows=6)
    out = tmp_path / "eval"
    code, _, err = invoke(
        "eval", "--student", tiny_model, "--base", teacher, "--dataset", data,
        "--backend", "transformers", "--max-new-tokens", "8", "--no-nll",
        "--on-policy-teacher", teacher, "--on-policy-samples", "2", "--output-dir", out,
    )  # fmt: skip
    assert code == 0, err[-3000:]
    report = json.loads((out / "report.json").read_text())
    student = report["models"]["student"]["metrics"]
    base = report["models"]["base"]["metrics"]
    assert student["on_policy_reverse_kl"] > 0.05 and student["on_policy_tokens"] > 0
    assert abs(base["on_policy_reverse_kl"]) < 1e-4  # the teacher against itself
    assert "reverse KL to teacher, own samples" in " ".join(err.split())


def test_eval_refuses_a_teacher_with_another_vocabulary(tiny_model: Path, tmp_path: Path) -> None:
    data = write_reverse_dataset(tmp_path / "t.eval.jsonl", rows=3)
    other = swap_two_tokens(tiny_model, tmp_path / "other")
    code, _, err = invoke(
        "eval", "--student", tiny_model, "--dataset", data, "--backend", "transformers",
        "--max-new-tokens", "4", "--no-nll", "--on-policy-teacher", other,
        "--output-dir", tmp_path / "eval",
    )  # fmt: skip
    assert code == 1
    assert "tokenize differently" in error_line(err) and "--cross-tokenizer" in error_line(err)
