"""Named benchmarks: the Hub dataset, columns, prompt and answer check lighteval and Open R1 use.

One home for every command that names a benchmark: `openkd eval --benchmark math500` scores a
model on it, `openkd decontaminate --benchmark math500` checks training prompts against it.

The definitions follow lighteval's tasks (`math_500`, `aime24`, `aime25`, `gpqa:diamond`,
which Open R1's `evaluate.py` copies): the same Hub ids and splits, the same user-message
templates (simple-evals' wording, with the final answer asked for in `\\boxed{}` for
math-verify, or as `Answer: LETTER` for GPQA). Gold answers: MATH-500's and AIME's `answer`
column (for MATH-500 lighteval extracts the same `\\boxed{}` value from `solution`); GPQA's is
the letter its correct option lands on after the four options are shuffled. lighteval
shuffles with an unseeded `random.randint`; here each row's order is seeded by its row
number, so a prompt is the same in every run.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from openkd.config import did_you_mean

AnswerKind = Literal["math", "choice"]

# lighteval's `math_500` / `aime24` / `aime25` user message (simple-evals' MATH prompt); the
# two spaces after "clearly." are theirs.
MATH_TEMPLATE = (
    "Solve the following math problem efficiently and clearly.  The last line of your response "
    "should be of the following format: 'Therefore, the final answer is: $\\boxed{{ANSWER}}$. "
    "I hope it is correct' (without quotes) where ANSWER is just the final number or expression "
    "that solves the problem. Think step by step before answering.\n\n{problem}"
)
# lighteval's `gpqa:diamond` user message (`gpqa_instruct`, simple-evals' GPQA prompt).
CHOICE_TEMPLATE = (
    "Answer the following multiple choice question. The last line of your response should be of "
    "the following format: 'Answer: $LETTER' (without quotes) where LETTER is one of ABCD. "
    "Think step by step before answering.\n\n{problem}\n\nA) {A}\nB) {B}\nC) {C}\nD) {D}"
)
LETTERS = "ABCD"
# The last "Answer: X" / "answer is (X)" / \boxed{X} in a response: what lighteval's letter
# extraction looks for first. The letter must stand alone ("Answer: Because" is no answer).
CHOICE_REGEX = (
    r"(?:(?i:answer)(?:\s+(?i:is))?\s*[:：]?|\\boxed\{)[\s*$({]*(?:\\text(?:bf)?\{)?\s*"
    r"\(?([ABCD])\b"
)
SHUFFLE_SEED = 0


@dataclass(frozen=True)
class NamedBenchmark:
    """A benchmark openkd knows by name."""

    name: str
    hub_id: str
    split: str
    subset: str | None
    problem_column: str  # the problem text: decontaminated against, put in the prompt
    gold_column: str | None  # None for multiple choice: the gold is the shuffled letter
    answer: AnswerKind
    lighteval: str  # the lighteval task this mirrors
    option_columns: tuple[str, ...] = ()  # multiple choice: the correct option first

    @property
    def columns(self) -> list[str]:
        """Every column a row is built from."""
        gold = [self.gold_column] if self.gold_column else []
        return [self.problem_column, *gold, *self.option_columns]

    @property
    def template(self) -> str:
        return CHOICE_TEMPLATE if self.answer == "choice" else MATH_TEMPLATE

    @property
    def answer_regex(self) -> str | None:
        """How the final answer is found: a regex for multiple choice; None is math-verify."""
        return CHOICE_REGEX if self.answer == "choice" else None

    def prompt_and_gold(self, row: Mapping[str, Any], index: int) -> tuple[str, str]:
        """Row `index`'s user message and gold answer, as lighteval builds them."""
        if self.answer == "choice":
            problem = str(row[self.problem_column]).strip()
            correct, *wrong = (str(row[c]).strip() for c in self.option_columns)
            position = random.Random(SHUFFLE_SEED * 1_000_003 + index).randint(0, len(wrong))
            options = [*wrong[:position], correct, *wrong[position:]]
            letters = dict(zip(LETTERS, options, strict=True))
            return self.template.format(problem=problem, **letters), LETTERS[position]
        assert self.gold_column is not None
        text = self.template.format(problem=row[self.problem_column])
        return text, str(row[self.gold_column]).strip()


NAMED: dict[str, NamedBenchmark] = {
    b.name: b
    for b in (
        NamedBenchmark(
            "math500", "HuggingFaceH4/MATH-500", "test", None, "problem", "answer", "math",
            "math_500",
        ),
        NamedBenchmark(
            "aime24", "HuggingFaceH4/aime_2024", "train", None, "problem", "answer", "math",
            "aime24",
        ),
        NamedBenchmark(
            "aime25", "yentinglin/aime_2025", "train", None, "problem", "answer", "math",
            "aime25",
        ),
        NamedBenchmark(
            "gpqa-diamond", "Idavidrein/gpqa", "train", "gpqa_diamond", "Question", None,
            "choice", "gpqa:diamond",
            option_columns=(
                "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3",
            ),
        ),
    )
}  # fmt: skip
ALIASES = {
    "math-500": "math500",
    "math_500": "math500",
    "aime2024": "aime24",
    "aime_2024": "aime24",
    "aime2025": "aime25",
    "aime_2025": "aime25",
    "gpqa_diamond": "gpqa-diamond",
    "gpqa-d": "gpqa-diamond",
}


def named(text: str) -> NamedBenchmark | None:
    """The named benchmark `text` names (case and `_`/`-` aside), or None."""
    key = text.strip().lower()
    return NAMED.get(ALIASES.get(key, key))


def unknown_name_hint(text: str) -> str:
    """` (did you mean 'math500'?)` for a near miss of a name, else an empty string."""
    return did_you_mean(text.strip().lower(), [*NAMED, *ALIASES])


def names() -> str:
    return ", ".join(NAMED)
