"""Word n-grams of normalised text, and the index of a benchmark's n-grams.

Open R1 (`scripts/decontaminate.py`, after s1) lowercases, collapses whitespace and splits
on it, so `8.` and `8`, or `x+y` and `x + y`, are different words there. Here text is
NFKC-normalised and case-folded, and every run of characters that is not a letter or digit
(punctuation, TeX markup, underscores, whitespace) separates words: a prompt that copies a
benchmark problem with other casing, punctuation or TeX spacing still shares its n-grams.
Both sides are normalised by the same function.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass

_SEPARATORS = re.compile(r"[\W_]+")
# The same for ASCII text, 3x faster: lower-case letters, every other non-alphanumeric a space.
_ASCII = str.maketrans(
    {chr(c): (chr(c).lower() if chr(c).isalnum() else " ") for c in range(128) if chr(c) != " "}
)


def words(text: str) -> list[str]:
    """The normalised words of `text`: `"What's 2+2?"` -> `["what", "s", "2", "2"]`."""
    if text.isascii():
        return text.translate(_ASCII).split()
    return _SEPARATORS.sub(" ", unicodedata.normalize("NFKC", text).casefold()).split()


def ngrams(tokens: list[str], n: int) -> Iterable[str]:
    """Every run of `n` consecutive words, joined by one space, in text order."""
    return (" ".join(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


@dataclass(frozen=True, slots=True)
class Match:
    """A shared n-gram: which benchmark (by position) and which of its rows it came from."""

    ngram: str
    benchmark: int
    row: int


class NgramIndex:
    """The n-grams of benchmark texts, each mapped to the first (benchmark, row) that has it."""

    def __init__(self, n: int) -> None:
        self.n = n
        self._where: dict[str, tuple[int, int]] = {}
        # Every word of every indexed n-gram: a window with any other word cannot match, so
        # most windows of a prompt are skipped without building their n-gram.
        self._vocabulary: set[str] = set()

    def __len__(self) -> int:
        return len(self._where)

    def add(self, text: str, benchmark: int, row: int) -> int:
        """Index `text`; return its number of words (fewer than n: it can never match)."""
        tokens = words(text)
        if len(tokens) >= self.n:
            self._vocabulary.update(tokens)
        for gram in ngrams(tokens, self.n):
            self._where.setdefault(gram, (benchmark, row))
        return len(tokens)

    def first_match(self, texts: Iterable[str]) -> Match | None:
        """The first n-gram of `texts`, in text order, that a benchmark has; None if none."""
        n, where, vocabulary = self.n, self._where, self._vocabulary
        for text in texts:
            tokens = words(text)
            known = 0  # how many words up to here are all in the vocabulary
            for end, token in enumerate(tokens, start=1):
                if token not in vocabulary:
                    known = 0
                    continue
                known += 1
                if known >= n:
                    gram = " ".join(tokens[end - n : end])
                    found = where.get(gram)
                    if found is not None:
                        return Match(gram, *found)
        return None
