"""Agreement metrics between a student's and a teacher's answers: small pure functions.

Text is compared after light normalisation (case, punctuation, whitespace), the convention of
SQuAD-style exact match and token F1. ROUGE-L is the F-measure of the longest common
subsequence of tokens (Lin, 2004), with beta = 1. An empty reference matches nothing, not even an
empty answer: a row without a teacher's answer must never score as perfect agreement.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

_PUNCT = str.maketrans("", "", string.punctuation)
_WS = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Lower-case, drop ASCII punctuation, collapse whitespace."""
    return _WS.sub(" ", text.lower().translate(_PUNCT)).strip()


def tokens(text: str) -> list[str]:
    """Whitespace tokens of the normalised text."""
    return normalize(text).split()


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when both texts are equal after normalisation, else 0.0 (always for an empty reference)."""
    if not reference.strip():
        return 0.0
    if not normalize(reference):  # punctuation only: compare as written, not as nothing
        return float(prediction.strip() == reference.strip())
    return float(normalize(prediction) == normalize(reference))


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall (bag of words); 0.0 if either has no token."""
    pred, ref = tokens(prediction), tokens(reference)
    if not pred or not ref:
        return 0.0
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
    """ROUGE-L F1 over normalised tokens; 0.0 if either has no token."""
    pred, ref = tokens(prediction), tokens(reference)
    if not pred or not ref:
        return 0.0
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def length_ratio(prediction_tokens: int, reference_tokens: int) -> float:
    """Student answer length over teacher answer length, in tokens (0 when the teacher's is empty)."""
    return prediction_tokens / reference_tokens if reference_tokens > 0 else 0.0


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def pass_at_k(n: int, c: int, k: int) -> float:
    """Chance that at least one of k answers drawn without replacement from n, of which c are
    correct, is correct: the unbiased estimator 1 - C(n-c, k) / C(n, k) (Chen et al., 2021),
    computed as a product so that large n neither overflows nor loses precision."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def pass_ks(n: int) -> list[int]:
    """The k of pass@k worth reporting for n samples: 1, the powers of 2 below n, and n."""
    ks, k = [1], 2
    while k < n:
        ks.append(k)
        k *= 2
    return [*ks, n] if n > 1 else ks
