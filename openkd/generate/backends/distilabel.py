"""`--backend distilabel`: any distilabel LLM class as the teacher (hosted APIs, local servers).

The class is imported by dotted path (`--llm-class distilabel.models.OpenAILLM`), built with
`llm_kwargs` from the YAML config, loaded, and called directly; distilabel's Pipeline is not
used. Facts about distilabel 1.5.3 this adapter relies on:

  - results are `{"generations": [text | None], "statistics": {"input_tokens": [n],
    "output_tokens": [n]}}` with no finish reason, so an answer whose `output_tokens` reaches
    `max_new_tokens` is recorded as truncated (finish_reason "length");
  - a `None` generation (e.g. an unreachable server inside a Task) is a failure, not an answer;
  - `AsyncLLM.generate` gathers requests without `return_exceptions`, so one bad prompt
    fails the whole batch; for async classes each prompt is sent with `agenerate` instead,
    in a sliding window of `--concurrency` requests over the whole dataset (the next prompt
    goes out as soon as an answer lands), and failures stay per prompt;
  - sampling arguments differ by class (`max_new_tokens` vs Anthropic's `max_tokens`,
    `stop` vs `stop_sequences`); each setting goes to the name the class accepts;
  - `distilabel.models.vLLM` breaks on vLLM's V1 engine; use `--backend vllm` for that.
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from openkd import console
from openkd.data.schema import FINISH_LENGTH, FINISH_STOP, Message
from openkd.errors import OpenkdError, brief
from openkd.generate.backends.base import Answer, BatchedBackend, Completion, Request, Sampling
from openkd.generate.backends.window import RequestWindow
from openkd.system import package_version

if TYPE_CHECKING:
    from openkd.generate.backends.spec import TeacherSpec

# Our setting -> the argument names distilabel classes use for it, in order of preference.
ARGUMENT_NAMES = {
    "max_new_tokens": ("max_new_tokens", "max_tokens"),
    "temperature": ("temperature",),
    "top_p": ("top_p",),
    "stop": ("stop", "stop_sequences"),
    "seed": ("seed",),
}


def import_llm_class(path: str) -> type:
    """The distilabel LLM class at `path` (`pkg.module.Class` or `pkg.module:Class`)."""
    module_name, _, attr = path.replace(":", ".").rpartition(".")
    if attr == "vLLM":
        raise OpenkdError(_VLLM_HINT.format(path=path))
    if not module_name:
        raise OpenkdError(
            f"--llm-class {path}: pass a dotted path such as distilabel.models.OpenAILLM"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise OpenkdError(
            f"--llm-class {path}: cannot import {module_name} ({brief(exc)}); "
            "install the package it needs, e.g. pip install 'distilabel[anthropic]'"
        ) from exc
    cls = getattr(module, attr, None)
    from distilabel.models.llms.base import LLM
    from distilabel.models.llms.vllm import vLLM

    if not (isinstance(cls, type) and issubclass(cls, LLM)):
        raise OpenkdError(
            f"--llm-class {path} is not a distilabel LLM class; "
            "see distilabel.models for the available ones"
        )
    if issubclass(cls, vLLM):
        raise OpenkdError(_VLLM_HINT.format(path=path))
    return cls


_VLLM_HINT = (
    "--llm-class {path}: distilabel's in-process vLLM class does not work with vLLM's V1 "
    "engine; use --backend vllm (in-process) or --backend openai --serve instead"
)


DEFAULT_IN_FLIGHT = 64  # hosted APIs rate-limit; raise --concurrency where yours allows more


class DistilabelBackend(BatchedBackend):
    """A distilabel `LLM` behind openkd's backend interface."""

    name = "distilabel"

    def __init__(self, cfg: TeacherSpec) -> None:
        super().__init__()
        assert cfg.llm_class is not None
        self.class_path = cfg.llm_class
        self.cls = import_llm_class(cfg.llm_class)
        self.concurrency = cfg.concurrency or DEFAULT_IN_FLIGHT
        kwargs = _constructor_kwargs(self.cls, cfg)
        try:
            self.llm = self.cls(**kwargs)
        except Exception as exc:
            raise OpenkdError(
                f"--llm-class {cfg.llm_class} rejected its arguments ({brief(exc)}); "
                "fix llm_kwargs in the YAML config"
            ) from exc
        self._arguments: dict[str, Any] | None = None
        self._loaded = False

    def start(self) -> None:
        try:
            self.llm.load()
        except Exception as exc:
            raise OpenkdError(
                f"{self.class_path}.load() failed ({brief(exc)}); check llm_kwargs, "
                "credentials and that the service is reachable"
            ) from exc
        self._loaded = True

    def close(self) -> None:
        if self._loaded:
            self._loaded = False
            try:
                self.llm.unload()
            except Exception as exc:  # closing must not hide the run's own outcome
                console.warn(f"{self.class_path}.unload() failed: {brief(exc)}")

    def versions(self) -> dict[str, str]:
        found = {"distilabel": package_version("distilabel")}
        if self.cls.__module__.startswith("distilabel.models.llms.openai"):
            found["openai"] = package_version("openai")
        return {k: v for k, v in found.items() if v}

    def in_flight(self) -> int:
        return self.concurrency

    def stream(self, requests: Iterable[Request], sampling: Sampling) -> Iterator[Answer]:
        from distilabel.models.llms.base import AsyncLLM

        if isinstance(self.llm, AsyncLLM) and not self.llm.use_offline_batch_generation:
            yield from self._window(iter(requests), sampling)
        else:
            yield from super().stream(requests, sampling)

    def generate_batch(self, batch: list[list[Message]], sampling: Sampling) -> list[Completion]:
        outputs = self._together(batch, self._generation_arguments(sampling))
        return [_completion(out, sampling) for out in outputs]

    def _window(self, pending: Iterator[Request], sampling: Sampling) -> Iterator[Answer]:
        """A sliding window of `agenerate` calls on the class's own event loop."""
        arguments = self._generation_arguments(sampling)
        with_n = getattr(self.llm, "_num_generations_param_supported", True)
        if with_n:
            arguments = {**arguments, "num_generations": 1}

        async def one(request: Request) -> Any:
            try:
                return await self.llm.agenerate(input=request.messages, **arguments)
            except Exception as exc:  # stays with its prompt
                return exc

        loop = self.llm.event_loop
        window: RequestWindow[Any] = RequestWindow(
            loop, pending, one, self.concurrency, self.stopping
        )
        for request, output in window.results(loop.run_until_complete):
            yield request, _completion(output, sampling)

    def _together(self, batch: list[list[Message]], arguments: dict[str, Any]) -> list[Any]:
        """One call for the batch; if it raises, one call per prompt so failures stay local."""
        try:
            return list(self.llm.generate_outputs(inputs=batch, num_generations=1, **arguments))
        except Exception as exc:
            if len(batch) == 1:
                return [exc]
        outputs: list[Any] = []
        for messages in batch:
            try:
                outputs.extend(
                    self.llm.generate_outputs(inputs=[messages], num_generations=1, **arguments)
                )
            except Exception as exc:
                outputs.append(exc)
        return outputs

    def _generation_arguments(self, sampling: Sampling) -> dict[str, Any]:
        if self._arguments is not None:
            return self._arguments
        accepted = _accepted_arguments(self.llm)
        arguments = dict(getattr(self.llm, "generation_kwargs", None) or {})
        wanted = {
            "max_new_tokens": sampling.max_new_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "stop": list(sampling.stop) or None,
            "seed": sampling.seed,
        }
        dropped = []
        for setting, value in wanted.items():
            name = next((n for n in ARGUMENT_NAMES[setting] if n in accepted), None)
            if name is not None:
                if value is not None:
                    arguments[name] = value
            elif setting == "seed" and "extra_body" in accepted:
                arguments["extra_body"] = {**(arguments.get("extra_body") or {}), "seed": value}
            elif value is not None and not (setting == "top_p" and value == 1.0):
                dropped.append(setting)
        if dropped:
            console.warn(
                f"{self.class_path} takes no {', '.join(dropped)}; not sent, so the teacher "
                "uses its own default for it"
            )
        self._arguments = arguments
        return arguments


def _accepted_arguments(llm: Any) -> set[str]:
    method = getattr(llm, "agenerate", None) or llm.generate
    return set(inspect.signature(method).parameters) - {"input", "inputs", "num_generations"}


def _constructor_kwargs(cls: type, cfg: TeacherSpec) -> dict[str, Any]:
    """llm_kwargs, plus openkd's flags for the fields the class has and llm_kwargs leaves out."""
    fields = getattr(cls, "model_fields", {})
    kwargs = dict(cfg.llm_kwargs)

    def default(name: str, value: Any) -> None:
        if name in fields and name not in kwargs and value is not None:
            kwargs[name] = value

    default("model", cfg.teacher)
    default("base_url", cfg.base_url)
    default("max_retries", cfg.max_retries)
    default("timeout", int(cfg.request_timeout))
    # Only when the user named a variable: each class has its own default (ANTHROPIC_API_KEY...).
    if "api_key_env" in cfg.model_fields_set:
        default("api_key", os.environ.get(cfg.api_key_env))
    return kwargs


def _completion(output: Any, sampling: Sampling) -> Completion:
    if isinstance(output, BaseException):
        return Completion.failure(brief(output))
    generations = (output or {}).get("generations") or [None]
    text = generations[0]
    if text is None:
        return Completion.failure("the distilabel LLM returned no generation (generation=None)")
    statistics = output.get("statistics") or {}
    prompt_tokens = _first(statistics.get("input_tokens"))
    completion_tokens = _first(statistics.get("output_tokens"))
    finish = (
        FINISH_LENGTH
        if completion_tokens is not None and completion_tokens >= sampling.max_new_tokens
        else FINISH_STOP
    )
    return Completion(
        text=text,
        finish_reason=finish,
        prompt_tokens=prompt_tokens or 0,
        completion_tokens=completion_tokens or 0,
    )


def _first(values: Any) -> int | None:
    if isinstance(values, list | tuple):
        values = values[0] if values else None
    return int(values) if isinstance(values, int | float) else None
