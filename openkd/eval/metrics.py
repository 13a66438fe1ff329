"""Agreement metrics between a student's and a teacher's answers: small pure functions.

Text is compared after light normalisation (case, punctuation, whitespace), the convention of
SQuAD-style exact match and token F1. ROUGE-L is the F-measure of the longest common
subsequence of tokens (Lin, 2004), with beta = 1.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

_PUNCT = str.maketrans("", "", string.punctuation)
_WS = re.compile(r"\s+")
BOXED = r"\\boxed\{"


def normalize(text: str) -> str:
    """Lower-case, drop ASCII punctuation, collapse whitespace."""
    return _WS.sub(" ", text.lower().translate(_PUNCT)).strip()


def tokens(text: str) -> list[str]:
    """Whitespace tokens of the normalised text."""
    return normalize(text).split()


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when both texts are equal after normalisation, else 0.0."""
    return float(normalize(prediction) == normalize(reference))


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall (bag of words). Two empty texts agree."""
    pred, ref = tokens(prediction), tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence, O(len(a) * len(b)) time, O(len(b)) memory."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 over normalised tokens. Two empty texts agree."""
    pred, ref = tokens(prediction), tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def length_ratio(prediction_tokens: int, reference_tokens: int) -> float:
    """Student answer length over teacher answer length, in tokens (0 when the teacher's is empty)."""
    return prediction_tokens / reference_tokens if reference_tokens > 0 else 0.0


def extract_answer(text: str, pattern: str | None = None) -> str | None:
    """The final answer in `text`: the last match of `pattern` (its first group, if any) or,
    by default, the content of the last `\\boxed{...}` (nested braces allowed). None if absent."""
    if pattern is None:
        return _last_boxed(text)
    matches = list(re.finditer(pattern, text))
    if not matches:
        return None
    last = matches[-1]
    return (last.group(1) if last.groups() else last.group(0)).strip()


def _last_boxed(text: str) -> str | None:
    starts = [m.end() for m in re.finditer(BOXED, text)]
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


def answers_match(predicted: str | None, gold: str) -> bool:
    """Final-answer equality: normalised text, and numerically when both parse as numbers."""
    if predicted is None:
        return False
    a, b = _canonical(predicted), _canonical(gold)
    if a == b:
        return True
    try:
        return abs(float(a) - float(b)) <= 1e-6 * max(1.0, abs(float(b)))
    except ValueError:
        return False


def _canonical(answer: str) -> str:
    text = answer.strip().strip("$").strip()
    text = text.replace(",", "") if re.fullmatch(r"-?[\d,]+(\.\d+)?", text) else text
    return _WS.sub("", text).rstrip(".").lower()


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0
