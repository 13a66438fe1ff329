"""The one small interface every teacher backend implements.

A backend takes a batch of chat conversations and returns one `Completion` per conversation,
in the same order. A request that failed after the backend's own retries comes back as a
`Completion` with `error` set (never raised), so one bad prompt cannot lose a batch; problems
that make the whole backend unusable (model path missing, server unreachable) raise
`OpenkdError` from `start()` or `generate()`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol

from openkd.data.schema import Message

FINISH_ERROR = "error"


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


@dataclass(frozen=True)
class Completion:
    """One answer. `error` is set (and `text` is None) when the request failed."""

    text: str | None
    finish_reason: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None or self.text is None

    @classmethod
    def failure(cls, reason: str) -> Completion:
        return cls(text=None, finish_reason=FINISH_ERROR, error=reason)


class Backend(Protocol):
    """A teacher. Use as a context manager: `with make_backend(cfg) as teacher: ...`."""

    name: str

    def start(self) -> None:
        """Load the model or connect; raise OpenkdError with the fix if that is impossible."""

    def generate(self, batch: list[list[Message]], sampling: Sampling) -> list[Completion]:
        """One Completion per conversation, same order."""
        ...

    def close(self) -> None:
        """Free the engine, stop child processes. Safe to call twice."""

    def versions(self) -> dict[str, str]:
        """Library versions for provenance, e.g. {"vllm": "0.11.0"}."""
        ...


class BackendBase:
    """Context-manager plumbing shared by the concrete backends."""

    name = "base"

    def start(self) -> None:
        return None

    def close(self) -> None:
        return None

    def versions(self) -> dict[str, str]:
        return {}

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
