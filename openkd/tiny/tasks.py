"""The toy tasks: prompts whose correct answer is a fixed function of the prompt. The mock
teacher answers by these rules, `make-tiny --prompts` writes prompts for them, and a student
that learns one can be scored exactly."""

from __future__ import annotations

import re
from collections.abc import Callable

NUMBER_RE = re.compile(r"-?\d+")
REVERSE_PREFIX = "Reverse the words: "
SUM_PREFIX = "Add the numbers: "


def reverse_words(prompt: str) -> str:
    """The words after the task prefix, in reverse order."""
    body = prompt.removeprefix(REVERSE_PREFIX)
    return " ".join(reversed(body.split()))


def sum_numbers(prompt: str) -> str:
    """The sum of every integer in the prompt."""
    return str(sum(int(n) for n in NUMBER_RE.findall(prompt)))


RULES: dict[str, Callable[[str], str]] = {
    "reverse": reverse_words,
    "sum": sum_numbers,
    "echo": lambda prompt: prompt,
}


def wrong_answer(answer: str) -> str:
    """A plausible wrong answer: a number off by one, or words in another order."""
    words = answer.split()
    if len(words) == 1 and words[0].lstrip("-").isdigit():
        return str(int(words[0]) + 1)
    return " ".join(words[1:] + words[:1]) if len(words) > 1 else answer + " indeed"
