"""The hand-over between the teacher's thread and the writer's: nothing lost, nothing waits."""

from __future__ import annotations

import threading
import time

import pytest

from openkd.generate import pump as pump_module
from openkd.generate.pump import Pump


def slow_stream(delays: list[float], fail_at: int | None = None):
    for i, delay in enumerate(delays):
        time.sleep(delay)
        if i == fail_at:
            raise RuntimeError("engine died")
        yield i


def collect(pump: Pump, wait: float = 0.05) -> tuple[list[int], int]:
    got, empty = [], 0
    for group in pump.groups(lambda: wait):
        got += group
        empty += not group
    return got, empty


def test_every_answer_arrives_once_in_order_and_idle_waits_wake_the_caller() -> None:
    with Pump(slow_stream([0.0] * 50 + [0.3] + [0.0] * 50)) as pump:
        got, empty = collect(pump)
    assert got == list(range(101))
    assert empty >= 3  # the caller woke up to commit while the stream was busy


def test_an_error_comes_after_the_answers_that_finished_before_it() -> None:
    got = []
    with pytest.raises(RuntimeError, match="engine died"), Pump(slow_stream([0.0] * 10, 6)) as pump:
        for group in pump.groups(lambda: 0.05):
            got += group
    assert got == list(range(6))


def test_stop_ends_the_stream_and_keeps_what_finished() -> None:
    stopped = threading.Event()

    def stream():
        i = 0
        while not stopped.is_set():
            yield i
            i += 1
            time.sleep(0.001)

    pump = Pump(stream(), stop=stopped.set)
    with pump:
        first = next(pump.groups(lambda: 0.05))
    rest = pump.leftovers()
    got = first + rest
    assert got == list(range(len(got))) and len(got) > 0
    assert not pump._thread.is_alive()


def test_a_fast_producer_is_held_back(monkeypatch) -> None:
    monkeypatch.setattr(pump_module, "MAX_BUFFERED", 100)
    produced = []

    def stream():
        for i in range(10_000):
            produced.append(i)
            yield i

    with Pump(stream()) as pump:
        time.sleep(0.2)  # the caller is busy; the producer must wait
        assert len(produced) <= 102
        got, _ = collect(pump)
    assert got == list(range(10_000))
