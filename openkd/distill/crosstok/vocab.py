"""Every token's bytes, so two vocabularies can be compared whatever their conventions.

Byte-level BPE (GPT-2, Llama 3, Qwen) writes byte b as one printable character (`Ġ` is the
space); SentencePiece (Llama 2, Gemma) writes the space as `▁` and unknown bytes as `<0xNN>`
(byte fallback). Reading each token as the bytes it decodes to makes `Ġhello`, `▁hello` and an
added token ` hello` the same token, and a byte-fallback `<0xE2>` the same as byte-level `â`.
Special tokens (EOS, chat markers) decode to no text here: they have no bytes (None).
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

import numpy as np

NO_ID = -1


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted: printable character -> byte."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def _decoder_types(tokenizer: Any) -> set[str]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return set()
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    found = {decoder.get("type", "")}
    for part in decoder.get("decoders") or []:
        found.add(part.get("type", ""))
    return found


def is_byte_level(tokenizer: Any) -> bool:
    """True when the tokenizer's decoder reads tokens as byte-level BPE characters."""
    return "ByteLevel" in _decoder_types(tokenizer)


def _sentencepiece_bytes(token: str) -> bytes:
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        try:
            return bytes([int(token[3:5], 16)])
        except ValueError:
            pass
    return token.replace("▁", " ").encode("utf-8")


def _byte_level_bytes(token: str) -> bytes | None:
    table = _byte_decoder()
    if all(c in table for c in token):
        return bytes(table[c] for c in token)
    return None  # not a byte-level token (an added token written as plain text)


def token_bytes(tokenizer: Any) -> list[bytes | None]:
    """The bytes of every id of `tokenizer` (added tokens included); None for special tokens."""
    size = len(tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(list(range(size)))
    special = set(tokenizer.all_special_ids)
    added = {
        i: t.content
        for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()
        if not t.special
    }
    byte_level = is_byte_level(tokenizer)
    table: list[bytes | None] = []
    for index, token in enumerate(tokens):
        if index in special or token is None:
            table.append(None)
        elif index in added:
            table.append(added[index].encode("utf-8"))
        elif byte_level:
            table.append(_byte_level_bytes(token) or token.encode("utf-8"))
        else:
            table.append(_sentencepiece_bytes(token))
    return table


def bytes_index(table: list[bytes | None]) -> dict[bytes, int]:
    """bytes -> the lowest id with those bytes (several ids can share them)."""
    index: dict[bytes, int] = {}
    for token_id, value in enumerate(table):
        if value is not None and value not in index:
            index[value] = token_id
    return index


def exact_map(teacher: list[bytes | None], student: dict[bytes, int]) -> np.ndarray:
    """teacher id -> the student id with the same bytes, or NO_ID (GOLD's matched vocabulary)."""
    return np.array(
        [NO_ID if b is None else student.get(b, NO_ID) for b in teacher], dtype=np.int64
    )


def longest_prefix(value: bytes, student: dict[bytes, int], longest: int) -> int:
    """The student id of the longest student token that starts `value`, or NO_ID."""
    for end in range(min(len(value), longest), 0, -1):
        found = student.get(value[:end])
        if found is not None:
            return found
    return NO_ID
