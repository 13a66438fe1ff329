"""Math verification with Hugging Face's math-verify: `\\frac{1}{2}` equals `0.5`.

The model's answer is searched for its final answer the way math-verify's docs recommend for
model output: LaTeX (the last `\\boxed{}` first, then `$...$` environments) and plain
expressions (`x = 3`, `1/2`). A gold answer is usually bare (`7`, `\\frac{14}{3}`, `\\{2,3\\}`)
and math-verify only reads LaTeX inside a math environment, so a gold answer without one is
read as `\\boxed{gold}` (falling back to the text as written). Anything math-verify cannot
decide is then compared as text (`openkd.verify.extract.same_answer`), so a boxed word
answer still counts.

Each call is bounded by `openkd.verify.deadline` (math-verify's own signal timeouts are turned
off, see there) and guarded against numbers too large to evaluate (`openkd.verify.guard`);
an exception inside math-verify or sympy becomes a "not verified" verdict with its reason.
"""

from __future__ import annotations

import logging
import re
from functools import cache
from typing import Any

from openkd.verify.deadline import DeadlineExceeded, deadline
from openkd.verify.extract import extract_answer, same_answer
from openkd.verify.guard import too_large
from openkd.verify.verdict import Verdict, shown

DEFAULT_TIMEOUT_S = 5.0
# Signs that a gold answer is already written in a math environment math-verify can find.
MATH_ENVIRONMENT = re.compile(r"\$|\\\(|\\\[|\\boxed|\\fbox|\\begin\{")


@cache
def _math_verify() -> tuple[Any, Any, list[Any]]:
    """math-verify, imported on first use (it pulls in sympy; `openkd --help` stays instant)."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    # Our verdicts carry the reasons; its warnings would repeat whole answers into the log, and
    # its "timeout is disabled" warning is expected (the deadline replaces its timeouts).
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    targets = [LatexExtractionConfig(), ExprExtractionConfig()]
    # The first parse loads the LaTeX grammar and sympy's lazy modules (~2 s on one core): do
    # it here, outside any deadline, so a verifier's first call is not counted as a timeout.
    verify(
        parse("$1/2$", targets, parsing_timeout=None),
        parse("0.5", targets, parsing_timeout=None),
        timeout_seconds=None,
    )
    return parse, verify, targets


def _parse(text: str) -> list[Any]:
    parse, _, targets = _math_verify()
    # raise_on_error: an error is reported as the verdict's reason, not logged and dropped.
    return parse(text, extraction_config=targets, parsing_timeout=None, raise_on_error=True)


def _parse_bare(text: str) -> list[Any]:
    """A bare answer (`7`, `x^2+1`, `\\{2,3\\}`): as if boxed, else as written."""
    boxed = [] if MATH_ENVIRONMENT.search(text) else _parse(f"\\boxed{{{text}}}")
    if _is_math(boxed):
        return boxed
    return _parse(text) or boxed


def _is_math(parsed: list[Any]) -> bool:
    # A parse that failed still returns the matched text (a str) as a fallback.
    return any(not isinstance(p, str) for p in parsed)


def _shown(parsed: list[Any]) -> str | None:
    # parse() returns [sympy object, the text it came from]; the text reads best.
    return shown(str(parsed[-1])) if parsed else None


def verify_math(
    answer_text: str,
    gold: str,
    pattern: re.Pattern[str] | None = None,
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
) -> Verdict:
    """Whether `answer_text`'s final answer equals `gold` mathematically.

    With `pattern`, the final answer is its last match (group 1 if any) instead of what
    math-verify finds. Never raises for any answer: errors, timeouts and unparseable input
    are verdicts with `correct=False` and a `reason`.
    """
    verify = _math_verify()[1]  # imported (and warmed up) outside the deadline
    found = extract_answer(answer_text, pattern)
    answer = gold_parsed = None
    try:
        with deadline(timeout_s):
            gold_parsed = _parse_bare(gold)
            answer = _parse_bare(found) if pattern and found else _parse(answer_text)
            if pattern and not found:
                reason = f"no final answer found (no match of --answer-regex {pattern.pattern!r})"
            elif not answer:
                reason = "no final answer found (no \\boxed{...} or final expression)"
            elif not _is_math(gold_parsed):
                reason = f"gold answer {shown(gold)!r} could not be read as math"
            elif not _is_math(answer):
                reason = f"final answer {_shown(answer)!r} could not be read as math"
            elif (problem := _too_large(answer) or _too_large(gold_parsed)) is not None:
                reason = f"not evaluated: {problem}"
            elif verify(gold_parsed, answer, timeout_seconds=None, raise_on_error=True):
                return Verdict(True, _shown(answer), _shown(gold_parsed), "math")
            else:
                reason = "answer differs from gold"
    except DeadlineExceeded:
        reason = f"verification took longer than {timeout_s:g} s"
    except Exception as exc:  # math-verify and sympy raise anything on odd input
        reason = f"math-verify failed ({type(exc).__name__}: {shown(str(exc)) or 'no message'})"
    # What math cannot decide may still be the same text: a boxed word, a label.
    if same_answer(found, gold):
        return Verdict(True, shown(found), shown(gold), "exact")
    shown_answer = _shown(answer) if answer else shown(found)
    shown_gold = _shown(gold_parsed) if gold_parsed else shown(gold)
    return Verdict(False, shown_answer, shown_gold, "math", reason)


def _too_large(parsed: list[Any]) -> str | None:
    return next((p for p in map(too_large, parsed) if p is not None), None)
