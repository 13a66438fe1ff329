"""A deterministic offline teacher: answers by a learnable rule, fails or truncates on request.

It exercises everything around a real teacher (streaming, resume, failures, truncation
filtering, token accounting) in seconds and without a model. Its rules (the toy tasks of
`openkd.tiny.tasks`, for which `openkd make-tiny --prompts` writes prompts) answer the last
user message, so a student trained on the answers can be scored exactly.

With `--mock-latency S` it behaves like a continuous-batching engine: at most `--concurrency`
answers decode at once, each takes S seconds per answer token, and a freed slot takes the next
request at once, so answers finish out of order (a long answer never holds up a short one).

Lengths are counted in whitespace-separated words, or in the teacher tokenizer's tokens when
`--teacher` is a local model directory (only the tokenizer is loaded).
"""

from __future__ import annotations

import heapq
import re
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from openkd.data.schema import FINISH_LENGTH, FINISH_STOP, Message
from openkd.errors import ConfigError, OpenkdError
from openkd.generate.backends.base import (
    Answer,
    BackendBase,
    Completion,
    Request,
    Sampling,
    TokenLogprobs,
)
from openkd.tiny.tasks import RULES, wrong_answer

if TYPE_CHECKING:
    from openkd.generate.backends.spec import TeacherSpec

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
DEFAULT_SLOTS = 256


def _regex(flag: str, pattern: str | None) -> re.Pattern[str] | None:
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise OpenkdError(f"{flag} '{pattern}' is not a valid regex ({exc}); fix it") from exc


def last_user_message(messages: list[Message]) -> str:
    for message in reversed(messages):
        if message["role"] == "user":
            return message["content"]
    return ""


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """`text` up to the earliest stop string (excluded), and whether one was found."""
    cuts = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


class MockBackend(BackendBase):
    """`--backend mock`: `--mock-rule`, `--mock-latency`, `--mock-fail`, `--mock-truncate`."""

    name = "mock"

    def __init__(self, cfg: TeacherSpec) -> None:
        super().__init__()
        self.rule = RULES[cfg.mock_rule]
        self.latency = cfg.mock_latency
        self.slots = cfg.concurrency or DEFAULT_SLOTS
        self.fail = _regex("--mock-fail", cfg.mock_fail)
        self.truncate = _regex("--mock-truncate", cfg.mock_truncate)
        self.wrong = _regex("--mock-wrong", cfg.mock_wrong)
        self.teacher = cfg.teacher
        self.trust_remote_code = cfg.trust_remote_code
        self.logprobs = cfg.logprobs
        self.logprobs_dtype = cfg.logprobs_dtype
        self._tokenizer: Any = None
        path = Path(self.teacher).expanduser()
        self._has_tokenizer = path.is_dir() and any((path / f).exists() for f in TOKENIZER_FILES)
        if self.logprobs and not self._has_tokenizer:
            raise ConfigError(
                "--logprobs with the mock teacher needs token ids: pass --teacher DIR, a model "
                "directory with tokenizer files (e.g. from `openkd make-tiny`)"
            )

    def start(self) -> None:
        if self._has_tokenizer:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(
                str(Path(self.teacher).expanduser()), trust_remote_code=self.trust_remote_code
            )

    def versions(self) -> dict[str, str]:
        if self._tokenizer is None:
            return {}
        import transformers

        return {"transformers": transformers.__version__}

    def in_flight(self) -> int:
        return self.slots if self.latency else 1

    def stream(self, requests: Iterable[Request], sampling: Sampling) -> Iterator[Answer]:
        if not self.latency:
            for request in requests:
                if self.stopping.is_set():
                    return
                yield request, self._answer(request.messages, sampling, request.sample)
            return
        yield from self._decode(iter(requests), sampling)

    def _decode(self, pending: Iterator[Request], sampling: Sampling) -> Iterator[Answer]:
        """Answers in the order a `slots`-wide engine would finish them, in real time."""
        running: list[tuple[float, int, Request, Completion]] = []
        order = 0
        while not self.stopping.is_set():
            while len(running) < self.slots:
                request = next(pending, None)
                if request is None:
                    break
                answer = self._answer(request.messages, sampling, request.sample)
                ends = time.monotonic() + self.latency * max(1, answer.completion_tokens)
                heapq.heappush(running, (ends, order, request, answer))
                order += 1
            if not running:
                return
            delay = running[0][0] - time.monotonic()
            if delay > 0 and self.stopping.wait(delay):
                return
            _, _, request, answer = heapq.heappop(running)
            yield request, answer

    def _answer(self, messages: list[Message], sampling: Sampling, sample: int = 0) -> Completion:
        prompt = last_user_message(messages)
        if self.fail is not None and self.fail.search(prompt):
            return Completion.failure(
                f"mock teacher: prompt matches --mock-fail '{self.fail.pattern}'"
            )
        answer = self.rule(prompt)
        if self.wrong is not None and self.wrong.search(prompt) and sample % 2 == 0:
            answer = wrong_answer(answer)
        text, stopped = cut_at_stop(answer, sampling.stop)
        units = self._split(text)
        limit = sampling.max_new_tokens
        finish = FINISH_STOP
        if self.truncate is not None and self.truncate.search(prompt) and not stopped:
            limit = min(limit, max(1, len(units) // 2))
            finish = FINISH_LENGTH
        if len(units) > limit:
            units, finish = units[:limit], FINISH_LENGTH
            text = self._join(units)
        return Completion(
            text=text,
            finish_reason=finish,
            prompt_tokens=self._prompt_tokens(messages),
            completion_tokens=len(units),
            logprobs=self._logprobs(units, finish) if self.logprobs else None,
        )

    def _logprobs(self, ids: list[int], finish: str) -> TokenLogprobs:
        """A deterministic, learnable teacher distribution: at each position the answer's own
        token has probability 0.6 and K-1 other tokens (chosen from the position and token)
        share 0.3 in decreasing steps; 0.1 is left outside the top-K."""
        import numpy as np

        assert self.logprobs is not None
        eos = self._tokenizer.eos_token_id
        tokens = [*ids, eos] if finish == FINISH_STOP and eos is not None else list(ids)
        k, vocab = self.logprobs, len(self._tokenizer)
        rest = np.arange(k - 1, 0, -1, dtype=np.float64)
        others = np.log(0.3 * rest / rest.sum()) if k > 1 else np.empty(0)
        top_ids = np.empty((len(tokens), k), dtype=np.int32)
        top_logprobs = np.empty((len(tokens), k), dtype=np.float32)
        for position, token in enumerate(tokens):
            rng = np.random.default_rng(token * 1_000_003 + position)
            choices = rng.choice(vocab - 1, size=k - 1, replace=False)
            top_ids[position] = [token, *(c + (c >= token) for c in choices)]  # never `token`
            top_logprobs[position] = [np.log(0.6), *others]
        dtype = np.float16 if self.logprobs_dtype == "float16" else np.float32
        return TokenLogprobs(
            np.asarray(tokens, dtype=np.int32), top_ids, top_logprobs.astype(dtype)
        )

    def _split(self, text: str) -> list[Any]:
        if self._tokenizer is None:
            return text.split()
        return self._tokenizer(text, add_special_tokens=False)["input_ids"]

    def _join(self, units: list[Any]) -> str:
        if self._tokenizer is None:
            return " ".join(units)
        return self._tokenizer.decode(units)

    def _prompt_tokens(self, messages: list[Message]) -> int:
        if self._tokenizer is None:
            return sum(len(m["content"].split()) for m in messages)
        if self._tokenizer.chat_template:
            text = self._tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        else:
            text = "\n".join(m["content"] for m in messages)
        return len(self._tokenizer(text, add_special_tokens=False)["input_ids"])
