"""The one small interface every teacher backend implements: a stream of answers.

A backend takes an iterator of `Request`s and yields `(request, completion)` as each answer
finishes, in finish order, keeping enough requests inside the engine and refilling it as
answers complete, so the teacher never waits for a batch's slowest answer. It pulls requests
lazily: a dataset of any size flows through it without being held in memory.

A request that failed after the backend's own retries comes back as a `Completion` with
`error` set (never raised), so one bad prompt costs one answer. Problems that make the whole
teacher unusable raise `OpenkdError` from `start()` or from the stream: a model path that
does not exist, or `TeacherUnavailable` when the engine died or the server stopped answering.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from itertools import islice
from typing import Any, NamedTuple, Protocol

from openkd.data.schema import Message
from openkd.errors import OpenkdError

FINISH_ERROR = "error"


class TeacherUnavailable(OpenkdError):
    """The teacher cannot answer any more requests (engine dead, server unreachable).

    The run stops sending, keeps what finished, and exits non-zero; a rerun continues.
    """


@dataclass(frozen=True)
class Sampling:
    """Decoding settings sent explicitly with every request and recorded with the data."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 4096
    stop: tuple[str, ...] = ()
    seed: int = 0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stop"] = list(self.stop)
        return d


class Request(NamedTuple):
    """One conversation for the teacher. Backends read `messages` and `sample` (the answer's
    number, which sets its seed: sampling.seed + sample); the rest is the caller's, passed back
    with the answer as is."""

    id: str
    messages: list[Message]
    row: int = 0  # the dataset row
    sample: int = 0  # which of --num-samples answers to the same prompt
    prompt_id: str | None = None  # shared by a prompt's samples (its sample 0's id)
    gold: str | None = None  # the gold final answer, for --verify


@dataclass(frozen=True)
class TokenLogprobs:
    """The teacher's answer as token ids, with its top-K log-probabilities at each position."""

    token_ids: Any  # int [T]
    top_ids: Any  # int [T, K]
    top_logprobs: Any  # float [T, K], raw (temperature 1)


@dataclass(frozen=True)
class Completion:
    """One answer. `error` is set (and `text` is None) when the request failed."""

    text: str | None
    finish_reason: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    logprobs: TokenLogprobs | None = None  # with --logprobs K

    @property
    def failed(self) -> bool:
        return self.error is not None or self.text is None

    @classmethod
    def failure(cls, reason: str) -> Completion:
        return cls(text=None, finish_reason=FINISH_ERROR, error=reason)


Answer = tuple[Request, Completion]


class Backend(Protocol):
    """A teacher. Use as a context manager: `with make_backend(spec) as teacher: ...`."""

    name: str

    def start(self) -> None:
        """Load the model or connect; raise OpenkdError with the fix if that is impossible."""

    def stream(self, requests: Iterable[Request], sampling: Sampling) -> Iterator[Answer]:
        """Each request answered once, yielded as soon as its answer is complete."""
        ...

    def in_flight(self) -> int:
        """How many requests the stream keeps inside the teacher at once."""
        ...

    def stop(self) -> None:
        """Ask a running stream (in another thread) to return soon; thread-safe."""

    def close(self) -> None:
        """Free the engine, stop child processes. Safe to call twice."""

    def versions(self) -> dict[str, str]:
        """Library versions for provenance, e.g. {"vllm": "0.11.0"}."""
        ...

    def __enter__(self) -> Backend: ...

    def __exit__(self, *exc: object) -> None: ...


class BackendBase:
    """Context-manager plumbing and the stop flag shared by the concrete backends."""

    name = "base"

    def __init__(self) -> None:
        self.stopping = threading.Event()

    def start(self) -> None:
        return None

    def stop(self) -> None:
        self.stopping.set()

    def close(self) -> None:
        return None

    def versions(self) -> dict[str, str]:
        return {}

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BatchedBackend(BackendBase):
    """The default adapter for teachers without continuous batching (`model.generate`, a
    synchronous distilabel class): requests are answered `in_flight()` at a time and yielded
    as each group returns. Subclasses implement `generate_batch`."""

    def in_flight(self) -> int:
        raise NotImplementedError

    def generate_batch(self, batch: list[list[Message]], sampling: Sampling) -> list[Completion]:
        """One Completion per conversation, same order."""
        raise NotImplementedError

    def stream(self, requests: Iterable[Request], sampling: Sampling) -> Iterator[Answer]:
        pending = iter(requests)
        while not self.stopping.is_set():
            group = list(islice(pending, self.in_flight()))
            if not group:
                return
            answers = self.generate_batch([r.messages for r in group], sampling)
            if len(answers) != len(group):
                raise OpenkdError(
                    f"the {self.name} backend returned {len(answers)} answers for {len(group)} "
                    "prompts; this is a bug in the backend, please report it"
                )
            yield from zip(group, answers, strict=True)


def answer_in_order(
    backend: Backend,
    conversations: list[list[Message]],
    sampling: Sampling,
    on_answer: Callable[[Completion], None] | None = None,
) -> list[Completion]:
    """Every conversation's answer, in input order, through the same streaming path as
    `openkd generate` (for callers that answer a fixed list: eval, tests)."""
    requests = (Request(id=str(i), messages=m, row=i) for i, m in enumerate(conversations))
    answers: list[Completion | None] = [None] * len(conversations)
    for request, completion in backend.stream(requests, sampling):
        answers[request.row] = completion
        if on_answer is not None:
            on_answer(completion)
    missing = "the teacher stopped before answering"
    return [a if a is not None else Completion.failure(missing) for a in answers]
