"""Training ends with a picture of its curves, linked from the card; trackio is the local tracker."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from openkd.train.curves import CURVES_FILE, write_curves
from tests.helpers import invoke
from tests.train_helpers import write_reverse_dataset

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
HARD = [{"step": s, "loss": 3.0 / s, "learning_rate": 1e-3} for s in (1, 2, 3)] + [
    {"step": 3, "train_runtime": 1.0}  # the Trainer's closing totals: no curve point
]
ON_POLICY = [{"step": s, "loss": 2.0 / s, "reverse_kl": 2.0 / s} for s in (1, 2, 3)]


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 1000


@pytest.mark.parametrize("history", [HARD, ON_POLICY], ids=["hard", "on-policy"])
def test_curves_are_a_png(history: list[dict], tmp_path: Path) -> None:
    path = write_curves(history, tmp_path)
    assert path == tmp_path / CURVES_FILE
    assert_png(path)
    assert [p.name for p in tmp_path.iterdir()] == [CURVES_FILE]  # no temporary file left


def test_nothing_logged_draws_nothing(tmp_path: Path) -> None:
    assert write_curves([{"step": 1, "train_runtime": 1.0}], tmp_path) is None
    assert not list(tmp_path.iterdir())


def test_missing_matplotlib_is_one_warning(tmp_path, monkeypatch, capsys) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises

    assert write_curves(HARD, tmp_path) is None

    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "matplotlib is not installed" in lines[0]
    assert not list(tmp_path.iterdir())


def test_a_failed_drawing_is_one_warning(tmp_path, monkeypatch, capsys) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("no fonts")

    monkeypatch.setattr("openkd.train.curves._draw", broken)

    assert write_curves(HARD, tmp_path) is None

    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "RuntimeError: no fonts" in lines[0]


@pytest.mark.slow
def test_training_leaves_its_curves_linked_from_the_card(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "student"
    data = write_reverse_dataset(tmp_path / "teacher.jsonl", rows=16)
    proc = invoke(
        "train", "--student", tiny_model, "--dataset", data, "--output-dir", out,
        "--max-steps", "3", "--batch-size", "4", "--logging-steps", "1", "--max-length", "64",
        env={"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_png(out / CURVES_FILE)
    assert (
        f"![Training curves: loss against step]({CURVES_FILE})" in (out / "README.md").read_text()
    )


def test_report_to_trackio_is_accepted() -> None:
    """trackio (`pip install 'openkd[trackio]'`) logs locally, under $HF_HOME/trackio."""
    pytest.importorskip("trackio")
    from openkd.train.arguments import check_report_to, report_to
    from openkd.train.config import TrainConfig

    cfg = TrainConfig(student="s", dataset="d", report_to="trackio")
    check_report_to(cfg.report_to)
    assert report_to(cfg.report_to) == ["trackio"]
