"""Find the final answer in a model's text and compare answers as text.

Both are deliberately plain: the last `\\boxed{...}` (nested braces allowed) or the last match
of a user regex, and equality after light normalisation (case, surrounding punctuation and
TeX `$`, all whitespace), numerically when both sides are numbers.
"""

from __future__ import annotations

import re
import unicodedata

BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
# Stripped from both ends: whitespace, sentence punctuation, quotes, markdown emphasis and TeX
# math delimiters. Signs, brackets and `%` are kept: they change what an answer means.
EDGE = " \t\r\n.,;:!?\"'`*$"
_WS = re.compile(r"\s+")
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?:e[-+]?\d+)?")
REL_TOL = 1e-6


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`) in `text`; None if absent or
    unclosed."""
    starts = [m.end() for m in BOXED.finditer(text)]
    if not starts:
        return None
    depth, start = 1, starts[-1]
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start:i].strip()
    return None


def extract_answer(text: str, pattern: str | re.Pattern[str] | None = None) -> str | None:
    """The final answer in `text`: the last match of `pattern` (its group 1 if it has groups,
    else the whole match) or, without a pattern, the last `\\boxed{...}`. None if absent."""
    if pattern is None:
        return last_boxed(text)
    last = None
    for last in re.finditer(pattern, text):  # noqa: B007 (only the last match counts)
        pass
    if last is None:
        return None
    found = last.group(1) if last.re.groups else last.group(0)
    return None if found is None else found.strip()


def normalise_answer(text: str) -> str:
    """Case-folded, without surrounding punctuation/`$` and without any whitespace."""
    text = unicodedata.normalize("NFKC", text).casefold().strip(EDGE)
    return _WS.sub("", text)


def _number(text: str) -> float | None:
    if not text or not _NUMBER.fullmatch(text) or not any(c.isdigit() for c in text):
        return None
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def same_answer(answer: str | None, gold: str) -> bool:
    """Equal after `normalise_answer`, or equal numbers (`1,234` = `1234`, `0.50` = `0.5`)."""
    if answer is None:
        return False
    a, b = normalise_answer(answer), normalise_answer(gold)
    if a == b:
        return bool(a)
    x, y = _number(a), _number(b)
    return x is not None and y is not None and abs(x - y) <= REL_TOL * max(1.0, abs(y))
