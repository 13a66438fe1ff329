"""The vLLM backend's engine loop against a stand-in engine: answers stream out in finish order,
the window is refilled as they finish, a prompt vLLM refuses fails alone, a dead engine stops
(also one whose process was killed while a step waited for it).

The stand-in has vLLM's offline surface (`LLM.enqueue_chat`, `LLMEngine.step`/`abort_request`);
the real engine's answers are covered by tests/test_vllm_engines.py.
"""

from __future__ import annotations

import itertools
import queue
import sys
import threading
from types import SimpleNamespace

import pytest

from openkd.generate.backends.base import Request, Sampling, TeacherUnavailable
from openkd.generate.backends.spec import teacher_spec
from openkd.generate.backends.vllm import VLLMBackend
from openkd.generate.config import GenerateConfig


class StubEngine:
    """Each request decodes one character of its prompt per step; 'BAD' prompts are refused at
    enqueue time as vLLM's validation refuses over-long prompts."""

    def __init__(self, dead_after: int | None = None) -> None:
        self.llm_engine = self
        self.running: dict[str, list] = {}
        self.added: list[str] = []
        self.aborted: list[str] = []
        self.max_running = 0
        self.steps = 0
        self.dead_after = dead_after
        self._ids = itertools.count()

    def enqueue_chat(self, conversations, params, use_tqdm=False):
        [conversation] = conversations
        text = conversation[-1]["content"]
        if text == "BAD":
            raise ValueError("The decoder prompt (length 9999) is longer than the maximum")
        external = str(next(self._ids))
        self.running[external] = [text, 0]
        self.added.append(text)
        self.max_running = max(self.max_running, len(self.running))
        return [f"{external}-1a2b3c4d"]  # vLLM returns the id with a random suffix

    def step(self):
        self.steps += 1
        if self.dead_after is not None and self.steps > self.dead_after:
            raise sys.modules["vllm.v1.engine.exceptions"].EngineDeadError("engine core died")
        finished = []
        for rid, state in list(self.running.items()):
            state[1] += 1
            if state[1] >= len(state[0]):
                del self.running[rid]
                finished.append(_output(rid, state[0]))
        return finished

    def abort_request(self, request_ids):
        self.aborted += request_ids


def _output(rid: str, text: str) -> SimpleNamespace:
    choice = SimpleNamespace(
        text=text[::-1], finish_reason="stop", token_ids=list(range(len(text)))
    )
    return SimpleNamespace(
        request_id=rid, finished=True, prompt_token_ids=[1, 2, 3], outputs=[choice]
    )


@pytest.fixture(autouse=True)
def engine_exceptions(monkeypatch: pytest.MonkeyPatch) -> None:
    class EngineDeadError(Exception):
        """Stands in for vllm.v1.engine.exceptions.EngineDeadError (importing vLLM is slow)."""

    exceptions = SimpleNamespace(EngineDeadError=EngineDeadError)
    monkeypatch.setitem(sys.modules, "vllm.v1.engine.exceptions", exceptions)


def backend_with(engine: StubEngine, concurrency: int = 3) -> VLLMBackend:
    cfg = GenerateConfig(teacher="t", dataset="d.jsonl", backend="vllm", concurrency=concurrency)
    backend = VLLMBackend(teacher_spec(cfg))
    backend._llm = engine
    backend.sampling_params = lambda sampling: None  # type: ignore[method-assign]
    return backend


def requests(*texts: str) -> list[Request]:
    return [
        Request(id=str(i), messages=[{"role": "user", "content": t}], row=i)
        for i, t in enumerate(texts)
    ]


def test_answers_stream_in_finish_order_and_the_window_refills() -> None:
    engine = StubEngine()
    texts = ("a" * 9, "bb", "c", "dddd", "e", "ff")
    answers = list(backend_with(engine, concurrency=3).stream(requests(*texts), Sampling()))
    finished = [request.messages[0]["content"] for request, _ in answers]
    # Short answers do not wait for the long first one; a freed slot is refilled at once.
    assert finished == ["c", "bb", "e", "dddd", "ff", "a" * 9]
    assert engine.max_running == 3 and engine.added == list(texts)
    assert engine.steps == 9  # the long answer's 9 steps: no step waited on a batch
    for request, completion in answers:
        assert completion.text == request.messages[0]["content"][::-1]
        assert completion.completion_tokens == len(request.messages[0]["content"])


def test_a_refused_prompt_fails_alone() -> None:
    engine = StubEngine()
    answers = dict(
        (r.row, c) for r, c in backend_with(engine).stream(requests("abc", "BAD", "de"), Sampling())
    )
    assert answers[0].text == "cba" and answers[2].text == "ed"
    assert answers[1].failed
    assert "vLLM rejected the prompt (ValueError: The decoder prompt" in answers[1].error


def test_dead_engine_stops_the_stream_with_the_reason() -> None:
    engine = StubEngine(dead_after=2)
    stream = backend_with(engine).stream(requests("ab", "cdefg", "hijkl", "mnopq"), Sampling())
    got = []
    with pytest.raises(TeacherUnavailable, match=r"the vLLM engine died .*engine core died.*rerun"):
        for answer in stream:
            got.append(answer)
    assert [r.messages[0]["content"] for r, _ in got] == ["ab"]  # what finished is yielded
    assert sorted(engine.aborted) == ["1", "2", "3"]  # the rest is released


def test_stop_returns_and_aborts_what_is_running() -> None:
    engine = StubEngine()
    backend = backend_with(engine)
    stream = backend.stream(requests("a", "bbbbbb", "cccccc", "dddddd", "e"), Sampling())
    first = next(stream)
    backend.stop()
    assert list(stream) == []
    assert first[0].messages[0]["content"] == "a"
    assert sorted(engine.aborted) == ["1", "2"]  # running when it stopped; nothing more added
    assert engine.added == ["a", "bbbbbb", "cccccc"]


class SilentlyDyingEngine(StubEngine):
    """A step waits on an output queue, as vLLM's multiprocess client does; the engine process
    then dies without a word (SIGKILL): vLLM's monitor only marks it dead, nothing is queued."""

    def __init__(self) -> None:
        super().__init__()
        ended = {"EngineCore_DP0": -9}
        manager = SimpleNamespace(finished_procs=lambda: ended)
        self.engine_core = SimpleNamespace(
            outputs_queue=queue.Queue(),
            resources=SimpleNamespace(engine_dead=False, engine_manager=manager),
        )

    def step(self):
        if self.steps == 1:  # the monitor notices the death while the second step waits
            threading.Timer(0.2, setattr, (self.engine_core.resources, "engine_dead", True)).start()
        if self.steps >= 1:
            outputs = self.engine_core.outputs_queue.get()  # vLLM's SyncMPClient.get_output
            if isinstance(outputs, Exception):
                raise outputs
        return super().step()


def test_an_engine_killed_without_a_word_stops_the_stream_instead_of_hanging() -> None:
    engine = SilentlyDyingEngine()
    result: list = []

    def consume() -> None:
        stream = backend_with(engine).stream(requests("a", "bcdef", "ghijk"), Sampling())
        try:
            for answer in stream:
                result.append(answer)
        except TeacherUnavailable as err:
            result.append(err)

    worker = threading.Thread(target=consume, daemon=True)
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive(), "the stream hung on a dead engine"
    *answers, error = result
    assert [r.messages[0]["content"] for r, _ in answers] == ["a"]
    assert isinstance(error, TeacherUnavailable)
    assert str(error).startswith(
        "the vLLM engine died (EngineCore_DP0 was killed by SIGKILL (the OOM killer sends it))"
    )
    assert sorted(engine.aborted) == ["1", "2"]
