"""The teacher as a vLLM engine inside this process (`--backend vllm`).

Conversations go through `LLM.chat`, so the teacher tokenizer's own chat template renders
them. vLLM 0.32 validates a whole `chat` call at once and raises if any prompt is longer than
the context, so prompts are measured first and only the over-long ones fail.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any

from openkd import console
from openkd.errors import ConfigError, OpenkdError
from openkd.generate.backends.base import BackendBase, Completion, Sampling
from openkd.generate.engine import (
    GENERATION_CONFIG_KEYS,
    check_answer_fits,
    engine_failed,
    engine_options,
    first_line,
    preflight,
)

if TYPE_CHECKING:
    from openkd.data.schema import Message
    from openkd.generate.config import GenerateConfig


BYTE_SLACK = 16


class VLLMBackend(BackendBase):
    """One `vllm.LLM` engine for the backend's life; `close()` shuts it down."""

    name = "vllm"

    def __init__(self, cfg: GenerateConfig) -> None:
        self.cfg = cfg
        self._llm: Any = None
        self._tokenizer: Any = None
        self._max_model_len = 0
        self._defaults: dict[str, Any] = {}
        self.start_seconds = 0.0

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
        self._tokenizer = self._llm.get_tokenizer()
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
        )

    def render(self, conversation: list[Message]) -> str:
        """The prompt text vLLM's chat path builds: the teacher's template, generation prompt on."""
        return self._tokenizer.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=False
        )

    def prompt_tokens(self, text: str) -> int:
        """Tokens of a rendered prompt, counted as vLLM counts them (no extra special tokens)."""
        return len(self._tokenizer.encode(text, add_special_tokens=False))

    def generate(self, batch: list[list[Message]], sampling: Sampling) -> list[Completion]:
        if self._llm is None:
            raise OpenkdError("the vLLM teacher is not started; use it as `with backend: ...`")
        problems = [self._length_problem(conversation) for conversation in batch]
        runnable = [conv for conv, problem in zip(batch, problems, strict=True) if problem is None]
        answers = iter(self._chat(runnable, self.sampling_params(sampling)))
        return [Completion.failure(p) if p else next(answers) for p in problems]

    def _length_problem(self, conversation: list[Message]) -> str | None:
        try:
            text = self.render(conversation)
        except Exception as err:
            return f"the teacher's chat template cannot render this prompt ({first_line(err)})"
        # Every token covers at least one byte of text, so short prompts need no tokenizing
        # (the slack covers a SentencePiece dummy prefix); tokenizing dominates this check.
        if len(text.encode("utf-8")) + BYTE_SLACK < self._max_model_len:
            return None
        n = self.prompt_tokens(text)
        if n >= self._max_model_len:
            return (
                f"prompt is {n} tokens but the teacher's context is {self._max_model_len} "
                "(--max-model-len), leaving no room for an answer"
            )
        return None

    def _chat(self, conversations: list[list[Message]], params: Any) -> list[Completion]:
        """One `LLM.chat` call; if vLLM rejects the batch, isolate the prompts it rejects."""
        if not conversations:
            return []
        try:
            outputs = self._llm.chat(conversations, params, use_tqdm=False)
        except Exception as err:
            self._raise_if_engine_dead(err)
            if len(conversations) == 1:
                return [Completion.failure(f"vLLM rejected the prompt ({first_line(err)})")]
            return [c for conv in conversations for c in self._chat([conv], params)]
        return [to_completion(output) for output in outputs]

    def _raise_if_engine_dead(self, err: Exception) -> None:
        # Only an imported module can have raised its own exception type: no import needed.
        exceptions = sys.modules.get("vllm.v1.engine.exceptions")
        if exceptions is not None and isinstance(err, exceptions.EngineDeadError):
            raise OpenkdError(
                f"the vLLM engine died ({first_line(err)}); see vLLM's log above, then rerun "
                "the same command to resume"
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


def to_completion(output: Any) -> Completion:
    """A vLLM `RequestOutput` as a Completion; an aborted request is a failure."""
    choice = output.outputs[0]
    if choice.finish_reason not in ("stop", "length"):
        return Completion.failure(
            f"vLLM ended the request with finish_reason={choice.finish_reason}"
        )
    return Completion(
        text=choice.text,
        finish_reason=choice.finish_reason,
        prompt_tokens=len(output.prompt_token_ids or ()),
        completion_tokens=len(choice.token_ids),
    )
