"""The teacher as a vLLM engine inside this process (`--backend vllm`).

The engine is driven directly: each conversation is rendered by vLLM's own chat path
(`LLM.enqueue_chat`, the teacher tokenizer's template) and added to the engine, and
`LLMEngine.step()` runs it; finished answers are yielded as the engine completes them. A window
of requests (twice the engine's `max_num_seqs` by default) stays inside the engine, so its
scheduler always has work to fill a slot the moment an answer ends, and nothing ever waits for
a batch's slowest answer. A prompt vLLM rejects (longer than the context) fails alone; a dead
engine stops the run with `TeacherUnavailable`.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterable, Iterator
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
from openkd.generate.vllm.engine import (
    GENERATION_CONFIG_KEYS,
    check_answer_fits,
    engine_failed,
    engine_options,
    preflight,
)

if TYPE_CHECKING:
    from openkd.generate.config import GenerateConfig

MIN_IN_FLIGHT = 64


class VLLMBackend(BackendBase):
    """One `vllm.LLM` engine for the backend's life; `close()` shuts it down."""

    name = "vllm"

    def __init__(self, cfg: GenerateConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self._llm: Any = None
        self._max_model_len = 0
        self._max_num_seqs = 0
        self._defaults: dict[str, Any] = {}
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
            self._llm = LLM(model=cfg.teacher, **engine_options(cfg))
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
        )

    def stream(self, requests: Iterable[Request], sampling: Sampling) -> Iterator[Answer]:
        if self._llm is None:
            raise OpenkdError("the vLLM teacher is not started; use it as `with backend: ...`")
        params = self.sampling_params(sampling)
        engine = self._llm.llm_engine
        pending = iter(requests)
        running: dict[str, Request] = {}
        limit = self.in_flight()
        try:
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
                try:
                    outputs = engine.step()
                except Exception as err:
                    self._raise_if_engine_dead(err)
                    raise
                for output in outputs:
                    if output.finished:
                        completion = to_completion(
                            output, self.cfg.logprobs, self.cfg.logprobs_dtype
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
            raise TeacherUnavailable(
                f"the vLLM engine died ({brief(err)}); finished answers are kept: see "
                "vLLM's log above, then rerun the same command to continue"
            ) from err

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


def to_completion(output: Any, k: int | None = None, dtype: str = "float16") -> Completion:
    """A vLLM `RequestOutput` as a Completion (with its top-`k` log-probabilities when `k`);
    an aborted request is a failure."""
    choice = output.outputs[0]
    if choice.finish_reason not in ("stop", "length"):
        return Completion.failure(
            f"vLLM ended the request with finish_reason={choice.finish_reason}"
        )
    logprobs = None
    if k:
        import numpy as np

        from openkd.data.logprobs import top_k_arrays

        # Per position {token id: Logprob(logprob, rank, decoded_token)}, the sampled token
        # added when it is not among the top k.
        positions = [
            {token: entry.logprob for token, entry in (position or {}).items()}
            for position in choice.logprobs or ()
        ]
        try:
            top_ids, top_logprobs = top_k_arrays(positions, k, dtype)
        except ValueError as err:
            return Completion.failure(f"vLLM's log-probabilities are unusable ({err})")
        token_ids = np.asarray(choice.token_ids, dtype=np.int32)
        if len(token_ids) != len(top_ids):
            return Completion.failure(
                f"vLLM returned log-probabilities for {len(top_ids)} of {len(token_ids)} tokens"
            )
        logprobs = TokenLogprobs(token_ids, top_ids, top_logprobs)
    return Completion(
        text=choice.text,
        finish_reason=choice.finish_reason,
        prompt_tokens=len(output.prompt_token_ids or ()),
        completion_tokens=len(choice.token_ids),
        logprobs=logprobs,
    )
