"""The eval metrics on hand-computed cases: exact match, token F1, ROUGE-L, length ratio, answers."""

from __future__ import annotations

import math

import pytest

from openkd.eval import metrics as m
from openkd.eval.nll import perplexity, token_budget_batches
from openkd.eval.report import Answer, summarize, table_rows
from openkd.verify.extract import extract_answer, same_answer


def test_exact_match_ignores_case_punctuation_and_spacing_only():
    assert m.exact_match("Tiger  apple.", "tiger apple") == 1.0
    assert m.exact_match("tiger apple", "apple tiger") == 0.0
    assert m.exact_match("tiger", "") == 0.0
    assert m.exact_match("?", "?") == 1.0 and m.exact_match("!", "?") == 0.0


def test_an_empty_reference_never_matches():
    """A row without a teacher answer must not score as perfect agreement (issue 15)."""
    for reference in ("", "   ", "\n"):
        for prediction in ("", "  ", "tiger"):
            assert m.exact_match(prediction, reference) == 0.0
            assert m.token_f1(prediction, reference) == 0.0
            assert m.rouge_l(prediction, reference) == 0.0
    # Punctuation alone normalises to nothing, yet is not the same as whitespace.
    assert m.exact_match("\n\n", '""') == 0.0


def test_token_f1_by_hand():
    # pred: a b c d (4), ref: a b e (3); common a, b -> P = 2/4, R = 2/3, F1 = 2PR/(P+R) = 4/7.
    assert m.token_f1("a b c d", "a b e") == pytest.approx(4 / 7)
    # Counts are clipped: pred "a a a" vs ref "a b": common 1 -> P = 1/3, R = 1/2, F1 = 0.4.
    assert m.token_f1("a a a", "a b") == pytest.approx(0.4)
    assert m.token_f1("x y", "a b") == 0.0
    assert m.token_f1("a", "") == 0.0 and m.token_f1("", "a") == 0.0


def test_rouge_l_by_hand():
    # pred: the cat sat on mat (5); ref: the cat was on the mat (6); LCS "the cat on mat" = 4.
    # P = 4/5, R = 4/6 -> F = 2 * 0.8 * 0.6667 / 1.4667 = 8/11.
    assert m.rouge_l("the cat sat on mat", "the cat was on the mat") == pytest.approx(8 / 11)
    # Order matters, unlike token F1: reversed words share only a 1-token subsequence.
    assert m.rouge_l("a b c", "c b a") == pytest.approx(1 / 3)
    assert m.token_f1("a b c", "c b a") == 1.0
    assert m.rouge_l("a b c", "a b c") == 1.0
    assert m.rouge_l("", "a") == 0.0


def test_lcs_length():
    assert m.lcs_length(list("ABCBDAB"), list("BDCABA")) == 4  # the textbook example
    assert m.lcs_length([], ["a"]) == 0


def test_length_ratio():
    assert m.length_ratio(6, 4) == 1.5
    assert m.length_ratio(3, 0) == 0.0


@pytest.mark.parametrize(
    "text,pattern,expected",
    [
        ("so the answer is \\boxed{42}.", None, "42"),
        ("first \\boxed{1} then \\boxed{\\frac{1}{2}}", None, "\\frac{1}{2}"),
        ("no box here", None, None),
        ("unclosed \\boxed{12", None, None),
        ("#### 1,234", r"####\s*(\S+)", "1,234"),
        ("Answer: B", r"Answer: ([A-D])", "B"),
    ],
)
def test_extract_answer(text, pattern, expected):
    assert extract_answer(text, pattern) == expected


def test_same_answer_numbers_and_text():
    assert same_answer("1,234", "1234")
    assert same_answer("0.50", "0.5")
    assert same_answer("$\\frac{1}{2}$", "\\frac{1}{2}")
    assert not same_answer("3", "4")
    assert not same_answer(None, "4")


def test_summarize_means_and_stop_rate():
    refs = [Answer("a b", "stop", 2), Answer("c d", "stop", 2)]
    answers = [Answer("a b", "stop", 2), Answer("c x y z", "length", 4)]
    out = summarize(answers, refs, [None, None], None, nll=(6.0, 4))
    assert out["exact_match"] == 0.5
    assert out["stop_rate"] == 0.5
    assert out["length_ratio"] == pytest.approx((1.0 + 2.0) / 2)
    # token F1 of the second: common 1, P = 1/4, R = 1/2 -> 1/3; mean with 1.0.
    assert out["token_f1"] == pytest.approx((1 + 1 / 3) / 2)
    assert out["nll"] == 1.5 and out["perplexity"] == pytest.approx(math.exp(1.5))
    assert "task_accuracy" not in out


def test_summarize_task_accuracy_only_on_rows_with_gold():
    refs = [Answer("\\boxed{4}", "stop", 3)] * 3
    answers = [
        Answer("\\boxed{4}", "stop", 3),
        Answer("\\boxed{5}", "stop", 3),
        Answer("x", "stop", 1),
    ]
    out = summarize(answers, refs, ["4", "4", None], None, nll=None)
    assert out["task_accuracy"] == 0.5 and out["task_rows"] == 2


def test_table_leaves_out_metrics_nobody_has():
    models = {
        "teacher": {"name": "T", "metrics": {"stop_rate": 1.0, "mean_tokens": 3.0}},
        "student": {"name": "S", "metrics": {"exact_match": 0.925, "stop_rate": 1.0, "failed": 0}},
    }
    headers, rows = table_rows(models)
    assert headers == ["metric", "teacher\nT", "student\nS"]
    labels = [r[0] for r in rows]
    assert "final-answer accuracy" not in labels and "failed requests" not in labels
    assert ["exact match with teacher", "-", "92.5 %"] in rows


def test_perplexity_and_token_budget():
    assert perplexity(0.0) == 1.0 and perplexity(None) is None and perplexity(1e6) is None
    batches = token_budget_batches([10, 500, 20, 30], max_batch=2, max_tokens=100)
    assert batches == [[1], [3, 2], [0]]  # longest first; 500 alone, then pairs under the budget
