"""openkd's flags as SFTConfig arguments, and the YAML-only `sft_args` pass-through."""

from __future__ import annotations

from unittest import mock

import pytest

from openkd.config import resolve
from openkd.errors import ConfigError
from openkd.train.arguments import (
    check_report_to,
    check_sft_args,
    make_sft_config,
    sft_fields,
    sft_kwargs,
)
from openkd.train.config import TrainConfig
from tests.conftest import write_jsonl
from tests.helpers import error_line, invoke, watch_model_loads
from tests.train_helpers import records, train_argv


@pytest.fixture(scope="module")
def fields() -> set[str]:
    return sft_fields()


def cfg(**values) -> TrainConfig:
    return resolve(TrainConfig, None, {"student": "s", "dataset": "d", **values})


def test_unknown_sft_field_is_named_with_a_suggestion(fields):
    with pytest.raises(
        ConfigError,
        match=r"sft_args\.max_grad_nrom is not a trl\.SFTConfig field \(did you mean 'max_grad_norm'\?\)",
    ):
        check_sft_args({"max_grad_nrom": 0.5}, fields)


@pytest.mark.parametrize(
    "key,flag",
    [
        ("learning_rate", "--learning-rate"),
        ("per_device_train_batch_size", "--batch-size"),
        ("gradient_checkpointing", "--gradient-checkpointing"),
        ("eos_token", "--eos-token"),
        ("hub_model_id", "--push-to-hub"),
        ("deepspeed", "--deepspeed"),
    ],
)
def test_fields_openkd_sets_point_to_the_flag(fields, key, flag):
    with pytest.raises(ConfigError) as err:
        check_sft_args({key: 1}, fields)
    assert f"sft_args.{key}: openkd sets this itself" in str(err.value) and flag in str(err.value)


def test_remote_code_cannot_sneak_in_through_model_init_kwargs(fields):
    with pytest.raises(ConfigError, match=r"use --trust-remote-code"):
        check_sft_args({"model_init_kwargs": {"trust_remote_code": True}}, fields)
    check_sft_args({"model_init_kwargs": {"dtype": "bfloat16"}, "max_grad_norm": 0.5}, fields)


def test_openkd_defaults_not_sftconfig_ones():
    kwargs = sft_kwargs(cfg(), cuda=False, bf16_gpu=False, has_eval=False)
    assert kwargs["bf16"] is False and kwargs["gradient_checkpointing"] is False
    assert kwargs["use_cpu"] is True and kwargs["completion_only_loss"] is True
    assert kwargs["max_steps"] == -1 and kwargs["eval_strategy"] == "no"
    assert kwargs["report_to"] == "none" and kwargs["push_to_hub"] is False
    args = make_sft_config(kwargs)
    assert args.bf16 is False and args.gradient_checkpointing is False and args.use_cpu


def test_bf16_is_automatic_on_bf16_gpus_and_explicit_wins():
    assert sft_kwargs(cfg(), cuda=True, bf16_gpu=True, has_eval=False)["bf16"] is True
    assert sft_kwargs(cfg(), cuda=True, bf16_gpu=False, has_eval=False)["bf16"] is False
    assert sft_kwargs(cfg(bf16=False), cuda=True, bf16_gpu=True, has_eval=False)["bf16"] is False
    fp16 = cfg(sft_args={"fp16": True})
    assert sft_kwargs(fp16, cuda=True, bf16_gpu=True, has_eval=False)["bf16"] is False


def test_flags_and_sft_args_reach_the_sft_config():
    c = cfg(
        max_steps=7,
        eval_steps=3,
        report_to="tensorboard,wandb",
        warmup_ratio=0.1,
        sft_args={"max_grad_norm": 0.25},
    )
    kwargs = sft_kwargs(c, cuda=False, bf16_gpu=False, has_eval=True)
    assert kwargs["report_to"] == ["tensorboard", "wandb"]
    kwargs["report_to"] = "none"  # the trackers are not installed here
    args = make_sft_config(kwargs)
    assert (args.max_steps, args.eval_steps, args.max_grad_norm) == (7, 3, 0.25)
    assert args.eval_strategy == "steps" and args.warmup_steps == 0.1
    # Without --eval-steps, evaluation follows the checkpoints.
    assert (
        sft_kwargs(cfg(save_steps=9), cuda=False, bf16_gpu=False, has_eval=True)["eval_steps"] == 9
    )


def test_invalid_sft_value_is_one_line_config_error():
    kwargs = sft_kwargs(
        cfg(sft_args={"lr_scheduler_kwargs": 5, "optim": "no_such_optimizer"}),
        cuda=False,
        bf16_gpu=False,
        has_eval=False,
    )
    with pytest.raises(ConfigError) as err:
        make_sft_config(kwargs)
    assert "invalid training settings" in str(err.value) and "\n" not in str(err.value)


def test_report_to_is_checked_before_the_model_loads(tiny_model, tmp_path, monkeypatch):
    loads = watch_model_loads(monkeypatch, weights=True)
    data = write_jsonl(tmp_path / "t.jsonl", records(8))
    out = tmp_path / "student"
    proc = invoke(*train_argv(tiny_model, data, out, report_to="nosuch"))
    assert proc.returncode == 2
    assert "--report-to nosuch: not a tracker" in error_line(proc.stderr)
    assert loads == [], "the student was loaded before --report-to was checked"
    assert not (out / "model.safetensors").exists()

    check_report_to("none")
    with pytest.raises(ConfigError, match=r"--report-to nosuch: not a tracker .*wandb"):
        check_report_to("nosuch")
    with mock.patch(
        "transformers.integrations.integration_utils.get_available_reporting_integrations",
        return_value=["tensorboard"],
    ):
        check_report_to("tensorboard")
        with pytest.raises(
            ConfigError, match=r"--report-to wandb: its Python package is not installed"
        ):
            check_report_to("tensorboard,wandb")
