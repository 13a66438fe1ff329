"""`openkd eval --serve` keeps each started server's log beside the report."""

from __future__ import annotations

from pathlib import Path

from openkd.eval.config import EvalConfig
from openkd.eval.run import _teacher_spec
from openkd.generate.backends.base import Sampling


def test_served_model_logs_go_to_the_eval_output_dir(tmp_path: Path) -> None:
    cfg = EvalConfig(
        student="s", dataset="d", backend="openai", serve=True, output_dir=tmp_path / "report"
    )
    spec = _teacher_spec(cfg, "student", "s", Sampling(max_new_tokens=8))
    assert spec.serve
    assert spec.server_log == tmp_path / "report" / "student.server.log"


def test_a_running_server_is_not_given_a_log(tmp_path: Path) -> None:
    cfg = EvalConfig(
        student="s",
        dataset="d",
        backend="openai",
        base_url="http://127.0.0.1:9/v1",
        output_dir=tmp_path / "report",
    )
    spec = _teacher_spec(cfg, "student", "s", Sampling(max_new_tokens=8))
    assert not spec.serve
    assert not str(spec.server_log).startswith(str(tmp_path))
