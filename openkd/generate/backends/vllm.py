"""The teacher as a vLLM engine inside this process (`--backend vllm`).

The engine is driven directly: each conversation is rendered by vLLM's own chat path
(`LLM.enqueue_chat`, the teacher tokenizer's template) and added to the engine, and
`LLMEngine.step()` runs it; finished answers are yielded as the engine completes them. A window
of requests (twice the engine's `max_num_seqs` by default) stays inside the engine, so its
scheduler always has work to fill a slot the moment an answer ends, and nothing ever waits for
a batch's slowest answer. A prompt vLLM rejects (longer than the context) fails alone; a dead
engine stops the run with `TeacherUnavailable`, also when its process was killed without a
word (SIGKILL, the OOM killer), which would otherwise leave a step waiting forever.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from openkd import console
from openkd.errors import ConfigError, OpenkdError, brief
from openkd.generate.backends.base import (
    Answer,
    BackendBase,
    Completion,
    Request,
    Sampling,
    TeacherUnavailable,
    TokenLogprobs,
)
from openkd.generate.vllm.options import (
    GENERATION_CONFIG_KEYS,
    check_answer_fits,
    engine_failed,
    llm_arguments,
    preflight,
)

if TYPE_CHECKING:
    from openkd.generate.backends.spec import TeacherSpec

MIN_IN_FLIGHT = 64
WATCH_SECONDS = 1.0  # how often a dead engine is looked for while a step waits


class VLLMBackend(BackendBase):
    """One `vllm.LLM` engine for the backend's life; `close()` shuts it down."""

    name = "vllm"

    def __init__(self, cfg: TeacherSpec) -> None:
        super().__init__()
        self.cfg = cfg
        self._llm: Any = None
        self._max_model_len = 0
        self._max_num_seqs = 0
        self._defaults: dict[str, Any] = {}
        self._tokenizer: Any = None
        self.start_seconds = 0.0

    def in_flight(self) -> int:
        return self.cfg.concurrency or max(MIN_IN_FLIGHT, 2 * self._max_num_seqs)

    def start(self) -> None:
        if self._llm is not None:
            return
        cfg = self.cfg
        if cfg.data_parallel_size > 1:
            raise ConfigError(
                f"--backend vllm runs one engine in this process and vLLM's offline LLM cannot do "
                f"data parallel; use --backend openai --serve --data-parallel-size "
                f"{cfg.data_parallel_size}, or split the data with --shard i/n (one job per replica)"
            )
        preflight(cfg)
        console.info(f"loading teacher {cfg.teacher} in vLLM (engine start takes a while)")
        t0 = time.perf_counter()
        from vllm import LLM

        try:
            self._llm = LLM(**llm_arguments(cfg))
        except Exception as err:
            raise engine_failed(cfg.teacher, err, "see vLLM's log above") from err
        self.start_seconds = time.perf_counter() - t0
        try:
            self._after_load()
        except BaseException:
            self.close()
            raise
        console.info(
            f"vLLM engine ready in {self.start_seconds:.0f} s "
            f"(context {self._max_model_len} tokens)"
        )

    def _after_load(self) -> None:
        model_config = self._llm.model_config
        self._max_model_len = int(model_config.max_model_len)
        check_answer_fits(self.cfg.max_new_tokens, self._max_model_len, "vLLM's max_model_len")
        from tokenizers import Tokenizer

        # The Rust tokenizer behind a fast tokenizer, which vLLM's fast detokenizer drives.
        raw = getattr(self._llm.get_tokenizer(), "_tokenizer", None)
        self._tokenizer = raw if isinstance(raw, Tokenizer) else None
        scheduler = self._llm.llm_engine.vllm_config.scheduler_config
        self._max_num_seqs = int(scheduler.max_num_seqs)
        # `vllm serve` applies these from generation_config.json to every request; doing
        # the same here keeps the two backends' answers identical.
        diff = model_config.get_diff_sampling_param()
        self._defaults = {k: diff[k] for k in GENERATION_CONFIG_KEYS if k in diff}
        if self._defaults:
            shown = ", ".join(f"{k}={v}" for k, v in self._defaults.items())
            console.info(
                f"teacher generation_config.json sets {shown} (applied, as vLLM serve does)"
            )

    def sampling_params(self, sampling: Sampling) -> Any:
        from vllm import SamplingParams

        return SamplingParams(
            **self._defaults,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_new_tokens,
            seed=sampling.seed,
            stop=list(sampling.stop) or None,
            logprobs=self.cfg.logprobs,
            # Flat lists instead of a dict of Logprob objects per position.
            flat_logprobs=bool(self.cfg.logprobs),
            detokenize=not self._decodes_itself(sampling),
        )

    def _decodes_itself(self, sampling: Sampling) -> bool:
        """With --logprobs, vLLM would decode each of the K alternatives at every position to
        text nobody reads (on CPU most of the labelling time: measured 5x slower). So openkd
        turns vLLM's detokenizer off and decodes each finished answer once, the way vLLM's fast
        detokenizer does (`answer_text`). Stop strings need vLLM's detokenizer, and a slow
        (Python) tokenizer is decoded differently: then it stays on."""
        return bool(self.cfg.logprobs) and not sampling.stop and self._tokenizer is not None

    def stream(self, requests: Iterable[Request], sampling: Sampling) -> Iterator[Answer]:
        if self._llm is None:
            raise OpenkdError("the vLLM teacher is not started; use it as `with backend: ...`")
        params = self.sampling_params(sampling)
        decode = None
        if self._decodes_itself(sampling):
            decode = functools.partial(answer_text, self._tokenizer)
        engine = self._llm.llm_engine
        core = getattr(engine, "engine_core", None)
        pending = iter(requests)
        running: dict[str, Request] = {}
        limit = self.in_flight()
        try:
            with watch_engine(core):
                while not self.stopping.is_set():
                    while len(running) < limit:
                        request = next(pending, None)
                        if request is None:
                            break
                        added = self._add(request, params)
                        if isinstance(added, Completion):
                            yield request, added
                        else:
                            running[added] = request
                    if not running:
                        return
                    if engine_dead(core):
                        raise self._dead(None)
                    try:
                        outputs = engine.step()
                    except Exception as err:
                        self._raise_if_engine_dead(err)
                        raise
                    for output in outputs:
                        if output.finished:
                            completion = to_completion(
                                output, self.cfg.logprobs, self.cfg.logprobs_dtype, decode
                            )
                            yield running.pop(output.request_id), completion
        finally:
            if running and self._llm is not None:
                # A dead engine has nothing left to abort.
                with contextlib.suppress(Exception):
                    engine.abort_request(list(running))

    def _add(self, request: Request, params: Any) -> str | Completion:
        """Add one conversation to the engine: its request id, or the failure if vLLM refuses it."""
        if request.sample:  # each of a prompt's samples draws with its own seed
            params = params.clone()
            params.seed = (params.seed or 0) + request.sample
        try:
            [added] = self._llm.enqueue_chat([request.messages], params, use_tqdm=False)
        except Exception as err:
            self._raise_if_engine_dead(err)
            return Completion.failure(f"vLLM rejected the prompt ({brief(err)})")
        # vLLM answers under the id it was given; the id it returns carries a random suffix.
        return added.split("-", 1)[0]

    def _raise_if_engine_dead(self, err: Exception) -> None:
        # Only an imported module can have raised its own exception type: no import needed.
        exceptions = sys.modules.get("vllm.v1.engine.exceptions")
        if exceptions is not None and isinstance(err, exceptions.EngineDeadError):
            raise self._dead(err) from err

    def _dead(self, err: Exception | None) -> TeacherUnavailable:
        core = getattr(self._llm.llm_engine, "engine_core", None) if self._llm else None
        why = ended_processes(core) or (brief(err) if err is not None else "no reason given")
        return TeacherUnavailable(
            f"the vLLM engine died ({why}); finished answers are kept: see vLLM's log above, "
            "then rerun the same command to continue"
        )

    def close(self) -> None:
        llm, self._llm = self._llm, None
        if llm is None:
            return
        engine_core = getattr(llm.llm_engine, "engine_core", None)
        if engine_core is not None:
            engine_core.shutdown()
        del llm
        import gc

        gc.collect()

    def versions(self) -> dict[str, str]:
        import vllm

        return {"vllm": vllm.__version__}


def engine_dead(core: Any) -> bool:
    """vLLM's own verdict: its liveness monitor marks the engine dead when a process ends."""
    return bool(getattr(getattr(core, "resources", None), "engine_dead", False))


def ended_processes(core: Any) -> str:
    """Which engine processes ended and how, e.g. "EngineCore_DP0 was killed by SIGKILL (the
    OOM killer sends it)"; empty when vLLM does not say."""
    manager = getattr(getattr(core, "resources", None), "engine_manager", None)
    try:
        ended = manager.finished_procs() if manager is not None else {}
    except Exception:  # bookkeeping of another vLLM version: the message does without it
        return ""
    return "; ".join(f"{name} {how_it_ended(code)}" for name, code in ended.items())


def how_it_ended(exit_code: int) -> str:
    if exit_code >= 0:
        return f"exited with code {exit_code}"
    try:
        sig = signal.Signals(-exit_code).name
    except ValueError:
        sig = f"signal {-exit_code}"
    return f"was killed by {sig}" + (" (the OOM killer sends it)" if sig == "SIGKILL" else "")


@contextlib.contextmanager
def watch_engine(core: Any, every: float = WATCH_SECONDS) -> Iterator[None]:
    """While the stream runs, wake a step that waits on a dead engine.

    When an engine process ends without a word (SIGKILL, the OOM killer, a segfault), vLLM's
    liveness monitor marks the engine dead and shuts its client down, but the thread that
    queues the engine's outputs exits without queuing an error, so a step already waiting for
    output waits forever (vLLM 0.32-0.34 `SyncMPClient.get_output`). Every `every` seconds
    this looks at vLLM's verdict and, once dead, queues the `EngineDeadError` that vLLM's async
    client queues in the same case: the step raises it.
    """
    outputs = getattr(core, "outputs_queue", None)
    if outputs is None or not hasattr(outputs, "put_nowait"):
        yield  # the engine runs in this process (no engine process to lose)
        return
    from vllm.v1.engine.exceptions import EngineDeadError

    done = threading.Event()

    def watch() -> None:
        while not done.wait(every):
            if engine_dead(core):
                outputs.put_nowait(EngineDeadError())
                return

    thread = threading.Thread(target=watch, name="openkd-engine-watch", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def to_completion(
    output: Any,
    k: int | None = None,
    dtype: str = "float16",
    decode: Callable[[Any], str] | None = None,
) -> Completion:
    """A vLLM `RequestOutput` as a Completion (with its top-`k` log-probabilities when `k`; its
    text from `decode` when vLLM did not detokenize); an aborted request is a failure."""
    choice = output.outputs[0]
    if choice.finish_reason not in ("stop", "length"):
        return Completion.failure(
            f"vLLM ended the request with finish_reason={choice.finish_reason}"
        )
    logprobs = None
    if k:
        import numpy as np

        from openkd.data.logprobs import top_k_arrays

        try:
            top_ids, top_logprobs = _ranked_top_k(choice.logprobs, k, dtype) or top_k_arrays(
                _positions(choice.logprobs), k, dtype
            )
        except ValueError as err:
            return Completion.failure(f"vLLM's log-probabilities are unusable ({err})")
        token_ids = np.asarray(choice.token_ids, dtype=np.int32)
        if len(token_ids) != len(top_ids):
            return Completion.failure(
                f"vLLM returned log-probabilities for {len(top_ids)} of {len(token_ids)} tokens"
            )
        logprobs = TokenLogprobs(token_ids, top_ids, top_logprobs)
    return Completion(
        text=choice.text if decode is None else decode(output),
        finish_reason=choice.finish_reason,
        prompt_tokens=len(output.prompt_token_ids or ()),
        completion_tokens=len(choice.token_ids),
        logprobs=logprobs,
    )


def _positions(logprobs: Any) -> list[dict[int, float]]:
    """Per position {token id: log-probability}, the sampled token included when it is not
    among the top k; from vLLM's flat lists, or from its {id: Logprob} dicts."""
    if logprobs is None:
        return []
    starts = getattr(logprobs, "start_indices", None)
    if starts is not None:
        ids, values = logprobs.token_ids, logprobs.logprobs
        return [
            dict(zip(ids[a:b], values[a:b], strict=True))
            for a, b in zip(starts, logprobs.end_indices, strict=True)
        ]
    return [{token: entry.logprob for token, entry in (p or {}).items()} for p in logprobs]


def answer_text(tokenizer: Any, output: Any) -> str:
    """An answer's text as vLLM's fast detokenizer builds it: a `DecodeStream` primed with the
    prompt's ids, stepped through the answer's, special tokens skipped, the stop token that
    ended it not decoded, and a trailing incomplete UTF-8 sequence left out."""
    from tokenizers.decoders import DecodeStream

    choice = output.outputs[0]
    ids = list(choice.token_ids)
    if choice.finish_reason == "stop" and ids:  # ended by EOS or a stop token id
        ids.pop()
    stream = DecodeStream(ids=list(output.prompt_token_ids or ()), skip_special_tokens=True)
    parts = []
    for token in ids:
        try:
            parts.append(stream.step(tokenizer, token))
        except Exception:  # invalid UTF-8 across the prompt boundary: restart, as vLLM does
            stream = DecodeStream(skip_special_tokens=True)
            parts.append(stream.step(tokenizer, token))
    return "".join(part for part in parts if part)


def _ranked_top_k(logprobs: Any, k: int, dtype: str) -> tuple[Any, Any] | None:
    """[T, k] ids and log-probabilities straight from vLLM's flat lists, where each position
    holds the sampled token and then ranks 1..k in order; None when they are not laid out so."""
    import numpy as np

    from openkd.data.logprobs.format import DTYPES, value_dtype

    starts = getattr(logprobs, "start_indices", None)
    if starts is None or not len(starts):
        return None
    width = k + 1
    if len(logprobs.token_ids) != width * len(starts) or starts[-1] != width * (len(starts) - 1):
        return None
    try:
        ranks = np.asarray(logprobs.ranks, dtype=np.int64).reshape(-1, width)[:, 1:]
    except (TypeError, ValueError):  # a rank vLLM left unset
        return None
    if not (ranks == np.arange(1, width)).all():
        return None
    ids = np.asarray(logprobs.token_ids, dtype=np.int32).reshape(-1, width)[:, 1:]
    values = np.asarray(logprobs.logprobs, dtype=np.float32).reshape(-1, width)[:, 1:]
    out_dtype = DTYPES[np.dtype(value_dtype(dtype)).name]
    return np.ascontiguousarray(ids), values.astype(out_dtype)
