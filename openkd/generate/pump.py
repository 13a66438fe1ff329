"""Run a backend's answer stream in a worker thread, so writing never stalls the teacher.

The worker keeps the engine fed (it adds requests as answers complete); the caller takes the
finished answers in groups, with a timeout, and so can commit the output on time even while no
answer arrives (a reasoning teacher can run for minutes between answers). The hand-over is a
deque and two events: a few hundred nanoseconds per answer, so a zero-latency teacher (the
mock) pays almost nothing for it. The deque is bounded: a worker faster than the writer waits.
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Iterator
from typing import Any

from openkd.generate.backends.base import Answer

_END = object()
# Answers the worker may run ahead of the writer; beyond this it waits (memory stays bounded).
MAX_BUFFERED = 1024
STOP_WAIT = 30.0  # seconds to wait for the worker after asking the backend to stop


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class Pump:
    """`with Pump(answers) as pump: for group in pump.groups(wait): ...`."""

    def __init__(self, answers: Iterator[Answer], stop: Any = None) -> None:
        self._answers = answers
        self._stop_backend = stop
        self._items: deque[Any] = deque()
        self._ready = threading.Event()
        self._room = threading.Event()
        self._room.set()
        self._quit = threading.Event()
        self._thread = threading.Thread(target=self._work, name="openkd-teacher", daemon=True)
        self.finished = False

    def __enter__(self) -> Pump:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Ask the stream to end and wait (bounded) for the worker; answers stay collectable."""
        self._quit.set()
        self._room.set()
        if self._stop_backend is not None:
            self._stop_backend()
        self._thread.join(STOP_WAIT)

    # -- worker ------------------------------------------------------------------------------

    def _work(self) -> None:
        items, ready, room = self._items, self._ready, self._room
        try:
            for answer in self._answers:
                items.append(answer)
                if not ready.is_set():
                    ready.set()
                if len(items) > MAX_BUFFERED:
                    room.clear()
                    if len(items) > MAX_BUFFERED and not self._quit.is_set():
                        room.wait(1.0)
                if self._quit.is_set():
                    break
        except BaseException as err:  # handed to the caller's thread, raised there
            items.append(_Failed(err))
        finally:
            close = getattr(self._answers, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    close()
            items.append(_END)
            ready.set()

    # -- caller ------------------------------------------------------------------------------

    def groups(self, wait: Any) -> Iterator[list[Answer]]:
        """Lists of finished answers; an empty list when `wait()` seconds pass without one.

        Ends when the stream does; re-raises the stream's exception after every answer that
        finished before it was handed over.
        """
        while True:
            if not self._items:
                self._ready.wait(max(0.0, wait()))
            self._ready.clear()
            group, error = self._drain()
            if group or not self.finished:
                yield group
            if error is not None:
                raise error
            if self.finished:
                return

    def leftovers(self) -> list[Answer]:
        """Answers finished but not yet collected (after `stop()`): they are kept, not lost."""
        group, _ = self._drain()
        return group

    def _drain(self) -> tuple[list[Answer], BaseException | None]:
        group: list[Answer] = []
        error = None
        items = self._items
        while items:
            item = items.popleft()
            if item is _END:
                self.finished = True
            elif isinstance(item, _Failed):
                error = item.error
            else:
                group.append(item)
        if not self._room.is_set():
            self._room.set()
        return group, error
