"""The soft-label proof: a student trained on the teacher's top-20 log-probabilities matches the
teacher's distribution far better than one trained on its answers alone, and agrees no less.

The teacher must not be degenerate (a random tiny model's next-token distribution is nearly
flat), so it is a tiny model trained briefly on the mock teacher's reverse-the-words answers.
It labels 3,000 prompts in real vLLM on CPU with `--logprobs 20`. Two students with the same
architecture and the same initialisation (another weight seed than the teacher's, one
tokenizer) train for the same steps on the same rows: `--loss hard` and `--loss mix`. One
`openkd eval` then scores both (the hard student as its `--base`) on the held-out rows against
the stored log-probabilities. Every command but vLLM's runs in this process, on one thread.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.helpers import invoke, one_thread

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PROMPTS = 3000
STEPS = 300
TRAIN = (
    "--batch-size", "32", "--max-length", "64", "--learning-rate", "1e-3",
    "--lr-scheduler-type", "constant_with_warmup", "--warmup-ratio", "0.05",
    "--save-steps", "1000",
)  # fmt: skip


def _ok(result) -> None:
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.fixture(scope="module")
def students(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    work = tmp_path_factory.mktemp("soft")
    with one_thread():
        return _students(work)


def _students(work: Path) -> dict[str, dict]:
    for args in (
        ("make-tiny", work / "init", "--prompts", work / "prompts.jsonl",
         "--num-prompts", str(PROMPTS)),
        ("make-tiny", work / "student-init", "--weights-seed", "1"),
        ("generate", "--backend", "mock", "--teacher", "mock", "--dataset", work / "prompts.jsonl",
         "--output", work / "mock/t.jsonl", "--max-samples", "2000"),
        ("train", "--student", work / "init", "--dataset", work / "mock/t.jsonl",
         "--output-dir", work / "teacher", "--max-steps", "120", *TRAIN),
    ):  # fmt: skip
        _ok(invoke(*args))
    # vLLM in a process of its own, as a user runs it (its engine starts worker processes).
    _ok(
        run_cli(
            "generate", "--backend", "vllm", "--teacher", work / "teacher",
            "--dataset", work / "prompts.jsonl", "--output", work / "labels/t.jsonl",
            "--logprobs", "20", "--eval-fraction", "0.1", "--max-new-tokens", "32",
            "--dtype", "float32", "--enforce-eager", "--max-model-len", "256",
            "--gpu-memory-utilization", "0.25", timeout=1200,
        )
    )  # fmt: skip
    meta = json.loads((work / "labels/t.meta.json").read_text())
    assert meta["logprobs"]["k"] == 20 and meta["status"] == "complete"
    for loss in ("hard", "mix"):
        _ok(
            invoke(
                "train", "--student", work / "student-init", "--dataset", work / "labels/t.jsonl",
                "--output-dir", work / f"student-{loss}", "--loss", loss,
                "--max-steps", str(STEPS), *TRAIN,
            )
        )  # fmt: skip
    # One evaluation scores both students (the hard one as its --base) on the same rows.
    _ok(
        invoke(
            "eval", "--student", work / "student-mix", "--base", work / "student-hard",
            "--dataset", work / "labels/t.eval.jsonl", "--backend", "transformers",
            "--output-dir", work / "eval",
        )
    )  # fmt: skip
    report = json.loads((work / "eval" / "report.json").read_text())
    return {
        loss: {"rows": report["rows"], **report["models"][role]["metrics"]}
        for loss, role in (("hard", "base"), ("mix", "student"))
    }


def test_soft_labels_bring_the_student_closer_to_the_teacher(students: dict[str, dict]):
    hard, mix = students["hard"], students["mix"]
    print(
        f"\nheld-out rows {hard['rows']}: KL(teacher || student) hard {hard['kl_to_teacher']:.3f}"
        f" -> mix {mix['kl_to_teacher']:.3f} ({mix['kl_to_teacher'] / hard['kl_to_teacher']:.2f}x);"
        f" exact agreement {hard['exact_match']:.1%} -> {mix['exact_match']:.1%}; top-1 token "
        f"agreement {hard['top1_agreement']:.1%} -> {mix['top1_agreement']:.1%}"
    )
    assert hard["rows"] >= 150
    assert mix["kl_to_teacher"] <= 0.8 * hard["kl_to_teacher"]
    # Whole-answer agreement over ~200-270 rows moves by several points between machines (CI saw
    # 30.6 % -> 28.2 %, here 27.3 % -> 33.3 %): only a clear loss fails; the KL is the claim.
    assert mix["exact_match"] >= hard["exact_match"] - 0.06
    assert mix["top1_agreement"] >= hard["top1_agreement"] - 0.01
    assert mix["exact_match"] > 0.1  # the students learned the task, not only the distribution
