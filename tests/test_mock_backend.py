"""The mock teacher on its own: rules, limits, stop strings, forced failures and truncation."""

from __future__ import annotations

import pytest

from openkd.config import resolve
from openkd.errors import OpenkdError
from openkd.generate.backends import make_backend
from openkd.generate.backends.base import Sampling, answer_in_order
from openkd.generate.backends.spec import teacher_spec
from openkd.generate.config import GenerateConfig


def _backend(**extra):
    values = {"backend": "mock", "teacher": "mock-teacher", "dataset": "d", **extra}
    return make_backend(teacher_spec(resolve(GenerateConfig, None, values)))


def _user(text: str) -> list[dict]:
    return [{"role": "system", "content": "ignored"}, {"role": "user", "content": text}]


@pytest.mark.parametrize(
    "rule,prompt,answer",
    [
        ("reverse", "Reverse the words: a b c", "c b a"),
        ("sum", "Add the numbers: 3 4 -2", "5"),
        ("echo", "say this", "say this"),
    ],
)
def test_rules_answer_the_last_user_message(rule, prompt, answer):
    with _backend(mock_rule=rule) as teacher:
        (done,) = answer_in_order(teacher, [_user(prompt)], Sampling())
    assert (done.text, done.finish_reason, done.failed) == (answer, "stop", False)
    assert done.completion_tokens == len(answer.split())
    assert done.prompt_tokens == 1 + len(prompt.split())  # system + user words


def test_limits_stop_strings_failures_and_forced_truncation():
    with _backend(mock_fail="boom", mock_truncate="slow") as teacher:
        cut, stopped, failed, forced = answer_in_order(
            teacher,
            [
                _user("Reverse the words: a b c d e"),
                _user("Reverse the words: x y STOP z"),
                _user("Reverse the words: boom"),
                _user("Reverse the words: slow w1 w2 w3"),
            ],
            Sampling(max_new_tokens=3, stop=("STOP",)),
        )
    assert (cut.text, cut.finish_reason, cut.completion_tokens) == ("e d c", "length", 3)
    assert (stopped.text, stopped.finish_reason) == ("z ", "stop")
    assert failed.failed and "--mock-fail 'boom'" in failed.error
    assert (forced.text, forced.finish_reason) == ("w3 w2", "length")


def test_invalid_regex_is_reported_by_flag():
    with pytest.raises(OpenkdError, match=r"--mock-truncate '\[' is not a valid regex"):
        _backend(mock_truncate="[")
