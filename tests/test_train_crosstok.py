"""`openkd train --loss soft|mix` when the teacher's tokenizer differs (or only its padding does).

Teacher: the session's tiny model (make-tiny seed 0). Student: make-tiny seed 1, another BPE
vocabulary. The sidecar is the teacher's own top-8 (`tests.soft_helpers`), as generate writes it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from openkd.data.jsonl import iter_jsonl
from tests.conftest import write_jsonl
from tests.helpers import error_line, invoke
from tests.soft_helpers import write_teacher_logprobs
from tests.train_helpers import train_argv, write_reverse_dataset

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def other_student(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from openkd.tiny import build_tiny_model
    from openkd.tiny.model import TinySpec

    return build_tiny_model(tmp_path_factory.mktemp("seed1") / "model", TinySpec(seed=1))


@pytest.fixture(scope="module")
def labels(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = write_reverse_dataset(tmp_path_factory.mktemp("xt") / "teacher.jsonl", rows=48)
    write_teacher_logprobs(tiny_model, data, k=8, teacher_name=str(tiny_model))
    return data


def train(student: Path, dataset: Path, out: Path, *extra: str, loss: str = "mix"):
    return invoke(
        *train_argv(
            student, dataset, out, *extra, loss=loss, max_steps=2, batch_size=8, max_length=96
        )
    )


def test_mix_across_tokenizers_trains_and_reports_coverage(
    other_student: Path, labels: Path, tmp_path: Path
):
    result = train(other_student, labels, tmp_path / "out")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "cross-tokenizer (gold, --cross-tokenizer auto)" in result.stderr
    run = json.loads((tmp_path / "out" / "openkd_run.json").read_text())
    cross = run["results"]["cross_tokenizer"]
    assert cross["method"] == "gold" and cross["coverage"] > 0.9 and cross["rows"] == 48
    assert run["identity"]["settings"]["cross_tokenizer"] == "gold"
    assert "| cross-tokenizer | gold, coverage" in (tmp_path / "out" / "README.md").read_text()


def test_uld_method_and_off(other_student: Path, labels: Path, tmp_path: Path):
    result = train(other_student, labels, tmp_path / "uld", "--cross-tokenizer", "uld")
    assert result.returncode == 0, result.stderr[-3000:]
    cross = json.loads((tmp_path / "uld" / "openkd_run.json").read_text())["results"]
    assert cross["cross_tokenizer"]["method"] == "uld" and cross["cross_tokenizer"]["uld"] > 0.9
    off = train(other_student, labels, tmp_path / "off", "--cross-tokenizer", "off")
    assert off.returncode != 0
    assert "tokenize differently" in error_line(off.stderr)
    assert "drop --cross-tokenizer off" in error_line(off.stderr)


def test_low_coverage_is_refused_unless_overridden(
    other_student: Path, labels: Path, tmp_path: Path
):
    import shutil

    changed = tmp_path / "teacher.jsonl"
    rows = [row for _, row in iter_jsonl(labels)]
    for row in rows:  # answers the stored ids no longer spell (another tokenizer wrote them)
        row["completion"][0]["content"] = row["completion"][0]["content"].upper()
    write_jsonl(changed, rows)
    shutil.copytree(labels.with_name("teacher.logprobs"), tmp_path / "teacher.logprobs")
    shutil.copy(labels.with_name("teacher.meta.json"), tmp_path / "teacher.meta.json")
    refused = train(other_student, changed, tmp_path / "out")
    line = error_line(refused.stderr)
    assert "only 0.0% of" in line and "do not spell the dataset's answer" in line
    assert "--cross-tokenizer-min-coverage 0" in line
    assert not (tmp_path / "out").exists()
    forced = train(other_student, changed, tmp_path / "out", "--cross-tokenizer-min-coverage", "0")
    assert forced.returncode == 0, forced.stderr[-3000:]


def test_padded_vocabulary_trains_plain_soft_labels_silently(
    tiny_model: Path, labels: Path, tmp_path: Path
):
    """Qwen2.5 7B has 152,064 embedding rows, 0.5B 151,936, one tokenizer: no alignment, no
    warning. The teacher here is the tiny model with 64 more (padding) rows."""
    import shutil

    from transformers import AutoModelForCausalLM

    padded = tmp_path / "padded-teacher"
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    model.resize_token_embeddings(model.config.vocab_size + 64)
    model.save_pretrained(padded)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tiny_model / name).exists():
            shutil.copy(tiny_model / name, padded / name)
    meta = labels.with_name("teacher.meta.json")
    data = tmp_path / "teacher.jsonl"
    shutil.copy(labels, data)
    shutil.copytree(labels.with_name("teacher.logprobs"), tmp_path / "teacher.logprobs")
    info = json.loads(meta.read_text())
    info["teacher"]["name"] = str(padded)
    (tmp_path / "teacher.meta.json").write_text(json.dumps(info))
    assert json.loads((padded / "config.json").read_text())["vocab_size"] == 2064
    result = train(tiny_model, data, tmp_path / "out", loss="soft")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "maps all its 2,000 tokens to the student's ids" in result.stderr
    assert not [ln for ln in result.stderr.splitlines() if ln.startswith("warning:")]
    assert (
        "cross_tokenizer"
        not in json.loads((tmp_path / "out" / "openkd_run.json").read_text())["results"]
    )


def test_eval_kl_to_the_teacher_over_aligned_positions(
    other_student: Path, labels: Path, tmp_path: Path
):
    result = invoke(
        "eval", "--student", other_student, "--dataset", labels, "--backend", "transformers",
        "--max-samples", "16", "--output-dir", tmp_path / "eval",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "KL to the teacher over the aligned positions" in result.stderr
    metrics = json.loads((tmp_path / "eval" / "report.json").read_text())["models"]["student"][
        "metrics"
    ]
    assert metrics["kl_coverage"] > 0.9 and metrics["kl_to_teacher"] > 0
