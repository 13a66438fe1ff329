"""Toy prompts whose correct answer is a fixed function of the prompt (the toy tasks of
`openkd.tiny.tasks`, which the mock teacher answers), so a student that learns the rule can be
scored exactly, offline, in minutes on a CPU; and the text the tiny tokenizer is trained on.
"""

from __future__ import annotations

import random

from openkd.tiny.tasks import REVERSE_PREFIX, SUM_PREFIX

WORDS = (
    "apple river stone cloud green quiet night tiger paper light storm music bread "
    "glass field dream silver honey north smile train ocean forest candle winter "
    "garden yellow mountain rabbit window silent purple thunder orange pencil mirror "
    "castle dragon summer planet rocket violet coffee marble shadow butter feather "
    "island copper spring anchor bridge lemon meadow velvet tunnel harbor puzzle"
).split()


def make_prompts(
    n: int, *, rule: str = "reverse", seed: int = 0, min_words: int = 3, max_words: int = 5
) -> list[str]:
    """`n` distinct prompts for `rule` ("reverse" or "sum"), reproducible from `seed`."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[str] = []
    while len(out) < n:
        if rule == "sum":
            k = rng.randint(2, 3)
            prompt = SUM_PREFIX + " ".join(str(rng.randint(0, 99)) for _ in range(k))
        else:
            k = rng.randint(min_words, max_words)
            prompt = REVERSE_PREFIX + " ".join(rng.choice(WORDS) for _ in range(k))
        if prompt not in seen:
            seen.add(prompt)
            out.append(prompt)
    return out


def corpus(n_lines: int = 4000, seed: int = 0) -> list[str]:
    """Text to train the tiny tokenizer on: the toy tasks' vocabulary plus chat-ish prose."""
    rng = random.Random(seed)
    lines = make_prompts(n_lines // 2, rule="reverse", seed=seed)
    lines += make_prompts(n_lines // 4, rule="sum", seed=seed + 1)
    for _ in range(n_lines // 4):
        lines.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) + ".")
    lines += [" ".join(str(i) for i in range(j, j + 10)) for j in range(0, 200, 10)]
    syllables = "ka lo mi ne ru sa ti vo ze pa be do fu gi ha ju ke li mo nu".split()
    for _ in range(n_lines):
        words = ("".join(rng.choice(syllables) for _ in range(rng.randint(2, 4))) for _ in range(6))
        lines.append(" ".join(words))
    lines += ["You are a helpful assistant.", "system user assistant", "Solve: What is 2 + 2?"]
    return lines
