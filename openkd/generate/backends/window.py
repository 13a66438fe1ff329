"""A sliding window of requests over an async teacher: at most `limit` in flight, and the next
prompt sent the moment an answer lands, from inside the event loop."""

from __future__ import annotations

import asyncio
import functools
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Generic, TypeVar

from openkd.generate.backends.base import Request

R = TypeVar("R")
POLL_SECONDS = 0.25  # how often a waiting consumer looks at the stop flag


class RequestWindow(Generic[R]):
    """The sliding window of requests, refilled inside the event loop.

    When an answer lands, its task's done-callback queues it in `landed` and submits the next
    request at once, in the same loop iteration: the server's batch is refilled without waiting
    for the consumer to write the answer, and no connection sits idle in the pool meanwhile (an
    HTTP pool probes the socket of every idle keep-alive connection on each request it handles).
    `submit` must return failures as results: an exception escaping it is a bug and ends the run.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        pending: Iterator[Request],
        submit: Callable[[Request], Awaitable[R]],
        limit: int,
        stopping: threading.Event,
    ) -> None:
        self.loop = loop
        self.pending: Iterator[Request] | None = pending
        self.submit = submit
        self.limit = limit
        self.stopping = stopping
        self.running: set[asyncio.Future[R]] = set()
        self.landed: deque[tuple[Request, R]] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None

    def results(self, run: Callable[[Awaitable[Any]], Any]) -> Iterator[tuple[Request, R]]:
        """Each request with its result, in the order they land; `run` drives the loop (its
        `run_until_complete`). Stops early, cancelling what is in flight, when `stopping` is set
        or the consumer stops iterating."""
        try:
            self.refill()
            while True:
                while self.landed:
                    yield self.landed.popleft()
                self._raise_error()
                if not self.running or self.stopping.is_set():
                    return
                run(self._wait(POLL_SECONDS))
        finally:
            self._close()
            if self.running:
                run(asyncio.gather(*self.running, return_exceptions=True))

    def refill(self) -> None:
        while self.pending is not None and len(self.running) < self.limit:
            if self.stopping.is_set():
                return
            try:
                request = next(self.pending, None)
            except BaseException as err:  # reading the prompts failed: the consumer re-raises it
                self._error, self.pending = err, None
                self._wake()
                return
            if request is None:
                self.pending = None
                return
            task = asyncio.ensure_future(self.submit(request), loop=self.loop)
            self.running.add(task)
            task.add_done_callback(functools.partial(self._landed, request))

    def _landed(self, request: Request, task: asyncio.Future[R]) -> None:
        self.running.discard(task)
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:  # a bug, not a failed request (those are results): stop the run
            self._error = self._error or error
            self.pending = None
        else:
            self.landed.append((request, task.result()))
            self.refill()
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _wait(self, timeout: float) -> None:
        """Until an answer lands, reading the prompts fails, or `timeout` seconds pass."""
        if self.landed or self._error is not None:
            return
        self._waiter = self.loop.create_future()
        timer = self.loop.call_later(timeout, self._wake)
        try:
            await self._waiter
        finally:
            timer.cancel()
            self._waiter = None

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _close(self) -> None:
        """Submit nothing more and cancel what is running."""
        self.pending = None
        for task in self.running:
            task.cancel()
