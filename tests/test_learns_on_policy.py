"""The on-policy proof: from one SFT checkpoint, `--loss on-policy` brings the student's own
answers much closer to its teacher than more hard-label SFT does, and agrees with it no less
(to within one held-out prompt: see the assertion).

- Teacher: a tiny model trained on the mock reverse-the-words answers, taken at the first
  checkpoint (every 10 steps) whose logged training loss is at most 0.35 nats per answer
  token: it has decided every answer's first token (the hard one: copying the prompt's last
  word), while its distributions are still soft, as a real LLM teacher's are. Its own greedy
  answers are the hard labels and the reference of exact agreement.
- Student start: the teacher run's first checkpoint past the loss plateau (token accuracy
  >= 50 %), SFT'd on the teacher's labels to the first checkpoint with 95 % of answer tokens
  right: imperfect, and behind the teacher.
- Two arms of 150 steps from that checkpoint, same rate (1e-3, decayed linearly to 0) and batch
  (32): (a) hard-label SFT, (b) `--loss on-policy` (reverse KL, beta 1, T 1, one sample per
  prompt). The decay matters: at a constant 1e-3 the on-policy student ends wherever its last
  noisy steps left it (one sampled path per prompt; batch reverse KL 0.04-0.13 over the last
  50 steps), and on one upstream state its held-out reverse KL came out 1.32x the SFT arm's
  with exact agreement 100 % -> 95.5 %; decayed, the same state gave 0.24x and 100 % -> 100 %.
- `openkd eval` scores both on the ~100 held-out prompts: exact agreement with the teacher's
  answers (greedy) and the per-token reverse KL to the teacher on each student's own samples
  (`--on-policy-teacher`, 4 per prompt, T 1).

Why these settings (measured, README "On-policy distillation"): a teacher taken softer (95 %
token accuracy, or loss 0.6) had barely chosen its first answer token (top-1 probability
0.05-0.12, the runner-up often within 2x); the on-policy student learns that distribution and
its greedy first token took the runner-up on 5-20 % of prompts, while the SFT student, taught
the greedy answers one-hot, did not. Checkpoints are picked by loss or accuracy, not by step,
because the step at which a tiny model leaves its loss plateau moves by 50+ steps between
seeds; the student starts past the teacher run's plateau because a second random
initialisation crossing its own one made the test slow and flaky (one seed: no exit within
300 steps). The training log's reverse KL is not asserted: it is one batch of 32 samples and
swings 0.05-0.4 between logged steps.

Each pair of independent trainings runs as two processes at once (one core each).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

PROMPTS = 2000
TEACHER_STEPS = 250
TEACHER_LOSS = 0.35
START_STEPS = 100
ARM_STEPS = 150
TRAIN = ("--batch-size", "32", "--max-length", "64", "--learning-rate", "1e-3")
WARMUP = ("--lr-scheduler-type", "constant_with_warmup", "--warmup-ratio", "0.05")
DECAY = ("--lr-scheduler-type", "linear", "--warmup-ratio", "0")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _openkd(work: Path, *args: str | Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "openkd", *(_relative(work, arg) for arg in args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        cwd=work,
    )


def _relative(work: Path, arg: str | Path) -> str:
    """Paths inside the work folder, relative to it: the teacher's name is part of every row
    id, and ids pick the held-out split, so an absolute (per-run temporary) teacher path would
    give each run its own held-out prompts (78-112 of 2,000 in three runs here)."""
    if isinstance(arg, Path) and arg.is_relative_to(work):
        return str(arg.relative_to(work))
    return str(arg)


def _together(work: Path, *commands: tuple[str | Path, ...]) -> list[str]:
    """Run `openkd` commands side by side in `work`; each must succeed. Their stderr, in order."""
    procs = [_openkd(work, *command) for command in commands]
    logs = []
    for proc in procs:
        _, err = proc.communicate(timeout=1800)
        assert proc.returncode == 0, err[-4000:]
        logs.append(err)
    return logs


def first_checkpoint(run: Path, key: str, passes) -> Path:
    """The first checkpoint of `run` whose logged `key` `passes`."""
    history = json.loads((run / "trainer_state.json").read_text())["log_history"]
    for entry in history:
        if key in entry and passes(entry[key]) and (run / f"checkpoint-{entry['step']}").is_dir():
            return run / f"checkpoint-{entry['step']}"
    raise AssertionError(f"{run.name}: no checkpoint's {key} passed: {history[-1]}")


def _checkpoints(steps: int, every: int) -> tuple[str, ...]:
    """Train `steps` steps, keeping a checkpoint every `every` (to pick one by its figures)."""
    return ("--max-steps", str(steps), *TRAIN, *WARMUP, "--save-steps", str(every),
            "--logging-steps", str(every), "--save-total-limit", str(steps // every))  # fmt: skip


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    work = tmp_path_factory.mktemp("on-policy")
    mock, labels = work / "mock" / "t.jsonl", work / "labels" / "t.jsonl"
    _together(
        work,
        ("make-tiny", work / "init", "--prompts", work / "prompts.jsonl",
         "--num-prompts", str(PROMPTS)),
    )  # fmt: skip
    _together(
        work,
        ("generate", "--backend", "mock", "--teacher", "mock", "--dataset",
         work / "prompts.jsonl", "--output", mock),
    )  # fmt: skip
    _together(
        work,
        ("train", "--student", work / "init", "--dataset", mock, "--output-dir",
         work / "teacher-run", *_checkpoints(TEACHER_STEPS, 10)),
    )  # fmt: skip
    teacher = first_checkpoint(work / "teacher-run", "loss", lambda x: x <= TEACHER_LOSS)
    # Its own greedy answers: what the student learns with hard labels, and the reference
    # exact agreement is measured against.
    _together(
        work,
        ("generate", "--backend", "transformers", "--teacher", teacher, "--dataset",
         work / "prompts.jsonl", "--output", labels, "--eval-fraction", "0.05",
         "--max-new-tokens", "32"),
    )  # fmt: skip
    # The student start: past the plateau, SFT'd on those answers to 95 % of tokens right.
    plateau = first_checkpoint(work / "teacher-run", "mean_token_accuracy", lambda x: x >= 0.5)
    _together(
        work,
        ("train", "--student", plateau, "--dataset", labels, "--output-dir",
         work / "start-run", *_checkpoints(START_STEPS, 10)),
    )  # fmt: skip
    start = first_checkpoint(work / "start-run", "mean_token_accuracy", lambda x: x >= 0.95)
    arm = ("--student", start, "--max-steps", str(ARM_STEPS), *TRAIN, *DECAY,
           "--save-steps", "1000", "--logging-steps", "25")  # fmt: skip
    _together(
        work,
        ("train", "--dataset", labels, "--output-dir", work / "sft", *arm),
        ("train", "--dataset", labels, "--output-dir", work / "on-policy", *arm,
         "--loss", "on-policy", "--teacher", teacher, "--max-completion-length", "32"),
    )  # fmt: skip
    _together(
        work,
        ("eval", "--student", work / "on-policy", "--base", work / "sft",
         "--dataset", labels.with_name("t.eval.jsonl"), "--backend", "transformers",
         "--on-policy-teacher", teacher, "--on-policy-samples", "4",
         "--output-dir", work / "eval"),
    )  # fmt: skip
    found = json.loads((work / "eval" / "report.json").read_text())
    found["training"] = json.loads((work / "on-policy" / "openkd_run.json").read_text())
    found["picked"] = {"teacher": teacher.name, "plateau": plateau.name, "start": start.name}
    # how often the teacher's greedy answer is the task's right answer (held-out prompts)
    right = {json.dumps(row["prompt"]): row["completion"] for row in _rows(mock)}
    taught = _rows(labels.with_name("t.eval.jsonl"))
    found["teacher_right"] = sum(
        row["completion"] == right[json.dumps(row["prompt"])] for row in taught
    ) / len(taught)
    return found


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_on_policy_brings_the_students_own_answers_closer_to_the_teacher(report: dict):
    models = report["models"]
    sft, op = models["base"]["metrics"], models["student"]["metrics"]
    trained = report["training"]["results"]
    picked = report["picked"]
    print(
        f"\nteacher {picked['teacher']} ({report['teacher_right']:.1%} of its held-out answers "
        f"right), start {picked['plateau']} + {picked['start']}; held-out prompts "
        f"{report['rows']}: reverse KL on own samples, hard-label SFT "
        f"{sft['on_policy_reverse_kl']:.3f} -> on-policy {op['on_policy_reverse_kl']:.3f} "
        f"({op['on_policy_reverse_kl'] / sft['on_policy_reverse_kl']:.2f}x); exact agreement "
        f"{sft['exact_match']:.1%} -> {op['exact_match']:.1%}; NLL of the teacher's answers "
        f"{sft['nll']:.3f} -> {op['nll']:.3f}; on-policy training reverse KL "
        f"{trained['reverse_kl_start']:.3f} -> {trained['reverse_kl_end']:.3f}, teacher "
        f"{trained['score_share']:.0%} of step time"
    )
    assert report["rows"] >= 80
    assert report["teacher_right"] >= 0.95  # the teacher has learned the task
    assert op["on_policy_reverse_kl"] <= 0.8 * sft["on_policy_reverse_kl"]
    # No worse, to one held-out prompt: upstream states differ between machines (a CI clone
    # picks other checkpoints), and one near-tied first word may flip. Two prompts fail.
    assert op["exact_match"] >= sft["exact_match"] - 1 / report["rows"] - 1e-9
    assert op["stop_rate"] >= 0.95 and sft["exact_match"] >= 0.9  # both learned the task
