"""Stop a call that runs past its time limit, in the main thread or any other.

math-verify bounds its own work with `signal.alarm`, which Python allows only in the main
thread. Called from another thread with its default timeouts, `math_verify.parse` raises
ValueError ("doesn't support threaded environment"); with its timeouts set to None it runs
unbounded, and an answer like `\\boxed{9^{9^{9^{9^{9}}}}}` then never returns. So the math
verifier always passes None to math-verify and bounds the whole verification here instead:

- in the main thread, with a SIGALRM timer (what math-verify itself does), restored after;
- elsewhere, with a watchdog timer thread that raises `DeadlineExceeded` in the verifying
  thread through `PyThreadState_SetAsyncExc`.

Either way Python can only stop between bytecodes: one long C-level operation (a power of
huge integers) finishes first. The math verifier refuses such expressions before evaluating
them (`openkd.verify.guard`), so the deadline only has to stop slow Python-level work.
"""

from __future__ import annotations

import ctypes
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class DeadlineExceeded(BaseException):
    """Raised inside the guarded block when it runs out of time. A BaseException, like
    math-verify's TimeoutException, so that libraries' `except Exception` cannot swallow it."""


@contextmanager
def deadline(seconds: float | None) -> Iterator[None]:
    """Raise DeadlineExceeded in this thread if the block is still running after `seconds`."""
    if seconds is None or seconds <= 0:
        yield
    elif _alarm_is_free():
        with _alarm(seconds):
            yield
    else:
        with _watchdog(seconds):
            yield


def _alarm_is_free() -> bool:
    """SIGALRM is usable: main thread, a POSIX system, and no timer of the caller's running."""
    if threading.current_thread() is not threading.main_thread():
        return False
    if not hasattr(signal, "setitimer"):
        return False
    return signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


@contextmanager
def _alarm(seconds: float) -> Iterator[None]:
    def expire(signum, frame):
        raise DeadlineExceeded

    previous = signal.signal(signal.SIGALRM, expire)
    try:
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    finally:
        # Outside the inner block: restored even when the timer fires as the block ends.
        signal.signal(signal.SIGALRM, previous)


@contextmanager
def _watchdog(seconds: float) -> Iterator[None]:
    target = threading.get_ident()
    lock = threading.Lock()
    state = {"armed": True, "fired": False}

    def expire() -> None:
        with lock:
            if state["armed"]:
                _async_raise(target, DeadlineExceeded)
                state["fired"] = True

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        with lock:
            state["armed"] = False
            if state["fired"]:
                # Fired as the block ended: withdraw the exception if it is still pending.
                _async_raise(target, None)
        timer.cancel()


def _async_raise(thread_id: int, exc: type[BaseException] | None) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread_id), ctypes.py_object(exc) if exc is not None else None
    )
