"""Answer verification: equivalent math accepted, wrong answers rejected, any thread, any input."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from openkd.errors import ConfigError
from openkd.verify import Verdict, make_verifier
from openkd.verify.extract import extract_answer, same_answer

math_check = make_verifier("math")

EQUIVALENT = [
    (r"so the answer is \boxed{\frac{1}{2}}", "0.5"),
    (r"\boxed{0.5}", r"\frac{1}{2}"),
    (r"... which gives \boxed{7}.", "7"),
    (r"\boxed{7}", r"\boxed{7}"),
    ("The answer is $x=3$", "3"),
    ("Therefore the answer is 1/2", r"$\frac{1}{2}$"),
    (r"\boxed{\dfrac{14}{3}}", r"\frac{14}{3}"),
    (r"\boxed{3\sqrt{2}}", r"\sqrt{18}"),
    (r"\boxed{\{3, 2\}}", r"\{2,3\}"),
    (r"\boxed{6-5i}", "6 - 5i"),
    (r"\boxed{1,234}", "1234"),
    (r"\boxed{\text{Evelyn}}", "Evelyn"),
]
WRONG = [
    (r"\boxed{8}", "7"),
    (r"\boxed{\frac{1}{3}}", "0.5"),
    (r"\boxed{-3}", "3"),
    (r"\boxed{3\sqrt{2}}", "3"),
    ("$x = 4$", "3"),
]


@pytest.mark.parametrize("answer,gold", EQUIVALENT)
def test_equivalent_math_is_accepted(answer, gold):
    verdict = math_check(answer, gold)
    assert verdict.correct, verdict
    assert verdict.reason is None and verdict.answer and verdict.gold


@pytest.mark.parametrize("answer,gold", WRONG)
def test_wrong_math_is_rejected_with_what_was_compared(answer, gold):
    verdict = math_check(answer, gold)
    assert not verdict.correct
    assert verdict.reason == "answer differs from gold"
    assert verdict.answer is not None and verdict.gold is not None


def test_verdict_names_what_it_extracted():
    verdict = math_check(r"With $x = 2$ we get $y = 3$, so \boxed{\frac{1}{2}}.", "0.5")
    assert verdict.correct and verdict.method == "math" and verdict.reason is None
    assert verdict.answer == r"\frac{1}{2}"
    gold = math_check(r"\boxed{7}", r"The answer is $\boxed{7}$")
    assert gold.correct and gold.gold == "7"
    assert set(verdict.to_dict()) == {"correct", "answer", "gold", "method", "reason"}


def test_nothing_to_extract_is_a_reason_not_an_error():
    verdict = math_check("I am not sure what the answer is.", "7")
    assert not verdict.correct and verdict.answer is None
    assert verdict.reason.startswith("no final answer found")
    unreadable = math_check(r"\boxed{7}", r"\frac{")
    assert not unreadable.correct and "could not be read as math" in unreadable.reason


def test_boxed_word_answers_still_count():
    """What math-verify cannot read as math is compared as text."""
    verdict = math_check(r"\boxed{\text{(B) Paris}}", r"\text{(B) Paris}")
    assert verdict.correct


def _pathological(timeout_s: float) -> list[tuple[Verdict, float]]:
    check = make_verifier("math", timeout_s=timeout_s)
    out = []
    for answer in (r"\boxed{9^{9^{9^{9^{9}}}}}", r"\boxed{(x+1)^{1000}}", r"\boxed{10^{10^{10}}}"):
        start = time.monotonic()
        out.append((check(answer, "7"), time.monotonic() - start))
    return out


def _assert_bounded(results: list[tuple[Verdict, float]], timeout_s: float) -> None:
    (tower, t1), (slow, t2), (huge, t3) = results
    assert not tower.correct and tower.reason.startswith("not evaluated: a number with")
    assert not huge.correct and huge.reason.startswith("not evaluated")
    assert not slow.correct and slow.reason == f"verification took longer than {timeout_s:g} s"
    assert max(t1, t3) < 2 and t2 < timeout_s + 2


def test_pathological_answers_are_bounded_in_the_main_thread():
    _assert_bounded(_pathological(0.5), 0.5)


def test_pathological_answers_are_bounded_in_a_worker_thread():
    """math-verify's own signal timeouts raise ValueError outside the main thread; ours do not."""
    with ThreadPoolExecutor(1) as pool:
        results = pool.submit(_pathological, 0.5).result(timeout=60)
    _assert_bounded(results, 0.5)


def test_verification_in_worker_threads_matches_the_main_thread():
    cases = EQUIVALENT + WRONG
    expected = [math_check(a, g) for a, g in cases]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda c: math_check(*c), cases))
    assert got == expected
    assert [v.correct for v in got] == [True] * len(EQUIVALENT) + [False] * len(WRONG)


def test_an_exception_inside_math_verify_is_a_verdict(monkeypatch):
    from openkd.verify import maths

    parse, _, targets = maths._math_verify()

    def broken(*args, **kwargs):
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(maths, "_math_verify", lambda: (parse, broken, targets))
    verdict = math_check(r"\boxed{7}", "8")
    assert not verdict.correct
    assert verdict.reason == "math-verify failed (RecursionError: maximum recursion depth exceeded)"


@pytest.mark.parametrize(
    "regex,answer,gold,correct,found",
    [
        (r"Answer: ([A-D])", "I think... Answer: B", "b", True, "B"),
        (r"Answer: ([A-D])", "Answer: A then Answer: C", "C", True, "C"),
        (r"####\s*(\S+)", "so #### 1,234", "1234", True, "1,234"),
        (r"####\s*(\S+)", "so #### 0.50", "0.5", True, "0.50"),
        (r"final: .+", "final: New York", "final: new york", True, "final: New York"),
        (r"Answer: (.+)", "Answer:   The Eiffel  Tower. ", '"the eiffel tower"', True, None),
        (r"Answer: (\w+)", "Answer: Lyon", "Paris", False, "Lyon"),
        (r"Answer: (-?\d+)", "Answer: -3", "3", False, "-3"),
        (None, r"done: \boxed{\frac{1}{\sqrt{2}}}", r"\frac{1}{\sqrt{2}}", True, None),
    ],
)
def test_exact_verifier(regex, answer, gold, correct, found):
    verdict = make_verifier("exact", regex)(answer, gold)
    assert verdict.correct is correct, verdict
    assert verdict.method == "exact"
    if found is not None:
        assert verdict.answer == found


def test_exact_verifier_without_a_match_says_so():
    verdict = make_verifier("exact", r"Answer: (\w+)")("no answer", "x")
    assert not verdict.correct and verdict.answer is None
    assert verdict.reason == "no final answer found (no match of --answer-regex 'Answer: (\\\\w+)')"


def test_last_boxed_handles_nesting_and_unclosed():
    assert extract_answer(r"a \boxed{1} b \boxed{\frac{1}{2}} c") == r"\frac{1}{2}"
    assert extract_answer(r"unclosed \boxed{12") is None
    assert not same_answer(None, "1") and not same_answer("", "")


def test_bad_verifier_settings_are_one_line_config_errors():
    with pytest.raises(ConfigError, match=r"--answer-regex '\(x' is not a valid regex") as err:
        make_verifier("exact", "(x")
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="unknown verifier 'maths'; use one of math, exact"):
        make_verifier("maths")  # type: ignore[arg-type]
