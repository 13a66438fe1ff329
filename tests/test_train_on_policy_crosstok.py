"""`openkd train --loss on-policy` when the teacher's vocabulary is not the student's.

Tiny models of make-tiny seeds 0 and 1 have different BPE vocabularies: on-policy trains with
TRL's GOLD trainer (text-aligned, JSD over shared tokens and ULD over the rest) and records
the method. A teacher of the student's tokenizer whose embeddings are padded to more rows
(Qwen2.5 7B vs 0.5B) trains with the plain on-policy trainer, silently. `--cross-tokenizer off`
refuses differing vocabularies in one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import error_line, invoke
from tests.train_helpers import train_argv, write_reverse_dataset

STEPS = 2


@pytest.fixture(scope="module")
def other_vocab(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny teacher whose tokenizer is make-tiny --seed 1's."""
    from openkd.tiny import build_tiny_model
    from openkd.tiny.model import TinySpec

    return build_tiny_model(tmp_path_factory.mktemp("seed1") / "model", TinySpec(seed=1))


@pytest.fixture(scope="module")
def padded(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with 64 more embedding rows: one tokenizer, a larger head."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("padded") / "model"
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    model.resize_token_embeddings(model.config.vocab_size + 64)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_reverse_dataset(tmp_path_factory.mktemp("data") / "labels.jsonl", rows=16)


def on_policy(student: Path, teacher: Path, dataset: Path, out: Path, *extra: str):
    return invoke(
        *train_argv(
            student, dataset, out, *extra,
            teacher=teacher, loss="on-policy", max_steps=STEPS, batch_size=4,
            max_completion_length=8, max_length=64, learning_rate="1e-3", logging_steps=1,
            save_steps=2, eval_fraction=0, seed=3,
        )
    )  # fmt: skip


def test_make_tiny_seeds_give_different_vocabularies(tiny_model: Path, other_vocab: Path) -> None:
    from transformers import AutoTokenizer

    a = AutoTokenizer.from_pretrained(tiny_model).get_vocab()
    b = AutoTokenizer.from_pretrained(other_vocab).get_vocab()
    differ = sum(1 for token, i in a.items() if b.get(token) != i)
    assert differ > len(a) // 2


@pytest.mark.slow  # imports TRL's GOLD trainer (seconds)
def test_preflight_alignment_counts_one_to_one_and_merged_spans(
    tiny_model: Path, other_vocab: Path
) -> None:
    """GOLD's byte-offset grouping, as the pre-flight reports it: words both tokenizers split
    alike pair one to one; "quizzical" (`ic` in one, `i` + `c` in the other) merges."""
    from transformers import AutoTokenizer

    from openkd.train.onpolicy.gold import alignment, describe_alignment

    student = AutoTokenizer.from_pretrained(tiny_model)
    teacher = AutoTokenizer.from_pretrained(other_vocab)
    same = alignment(teacher, student, ["Reverse the words: dragon pencil paper"])
    assert same == {"positions": 7, "one_to_one": 7, "merged": 0}
    split = alignment(teacher, student, ["quizzical"])
    assert split["merged"] >= 1 and split["one_to_one"] + split["merged"] == split["positions"]
    assert describe_alignment(same, 1, "answers") == (
        "on the first 1 rows' answers, 100.0% of 7 student tokens align with teacher tokens "
        "(100.0% one to one, 0.0% in merged spans)"
    )


@pytest.mark.slow
def test_on_policy_across_tokenizers_trains_with_gold(
    tiny_model: Path, other_vocab: Path, data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    result = on_policy(tiny_model, other_vocab, data, out)
    assert result.returncode == 0, result.stderr[-3000:]
    err = " ".join(result.stderr.split())
    assert "tokenize differently" not in err
    assert "cross-tokenizer on-policy (gold, --cross-tokenizer auto)" in err
    assert "of the teacher's tokens are a student token" in err
    assert "student tokens align with teacher tokens" in err
    run = json.loads((out / "openkd_run.json").read_text())
    assert run["identity"]["settings"]["cross_tokenizer"] == "gold"
    assert run["results"]["cross_tokenizer_method"] == "gold"
    assert run["results"]["global_step"] == STEPS
    assert run["results"]["reverse_kl_start"] is None  # not faked across vocabularies
    card = (out / "README.md").read_text()
    assert "on-policy across tokenizers (gold)" in card
    assert "GOLDTrainer" in card
    assert (out / "model.safetensors").is_file()


@pytest.mark.slow
def test_uld_is_another_run(
    tiny_model: Path, other_vocab: Path, data: Path, tmp_path: Path
) -> None:
    """--cross-tokenizer uld trains too; its method is in the run identity."""
    out = tmp_path / "out"
    result = on_policy(tiny_model, other_vocab, data, out, "--cross-tokenizer", "uld")
    assert result.returncode == 0, result.stderr[-3000:]
    run = json.loads((out / "openkd_run.json").read_text())
    assert run["identity"]["settings"]["cross_tokenizer"] == "uld"
    assert "ULD: sorted-probability L1" in (out / "README.md").read_text()


@pytest.mark.slow
def test_padded_vocabulary_trains_silently(
    tiny_model: Path, padded: Path, data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    result = on_policy(tiny_model, padded, data, out)
    assert result.returncode == 0, result.stderr[-3000:]
    err = " ".join(result.stderr.split())
    assert "warning:" not in err  # openkd's warnings (console.warn)
    assert "tokenize differently" not in err
    assert "its head has 2,064 rows and the student's 2,000" in err
    run = json.loads((out / "openkd_run.json").read_text())
    assert "cross_tokenizer" not in run["identity"]["settings"]
    assert run["results"]["reverse_kl_start"] is not None  # the plain trainer's metric
    assert "TRL DistillationTrainer" in (out / "README.md").read_text()


def test_cross_tokenizer_off_refuses_in_one_line(
    tiny_model: Path, other_vocab: Path, data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    result = on_policy(tiny_model, other_vocab, data, out, "--cross-tokenizer", "off")
    assert result.returncode != 0
    line = error_line(result.stderr)
    assert "tokenize differently" in line
    assert "drop --cross-tokenizer off" in line
    assert not (out / "model.safetensors").exists()


def test_cross_tokenizer_min_coverage_stays_offline_only(
    tiny_model: Path, data: Path, tmp_path: Path
) -> None:
    result = on_policy(
        tiny_model, tiny_model, data, tmp_path / "out", "--cross-tokenizer-min-coverage", "0"
    )
    assert result.returncode != 0
    assert "--cross-tokenizer-min-coverage applies to --loss soft|mix only" in error_line(
        result.stderr
    )


@pytest.mark.slow
def test_gold_run_stops_at_the_first_non_finite_step(
    tiny_model: Path, other_vocab: Path, data: Path, tmp_path: Path
) -> None:
    """openkd's non-finite guard holds on GOLD's trainer: one line, no student saved."""
    out = tmp_path / "out"
    result = on_policy(
        tiny_model, other_vocab, data, out,
        "--learning-rate", "1e30", "--lr-scheduler-type", "constant", "--warmup-ratio", "0",
    )  # fmt: skip
    assert result.returncode == 1
    assert "training diverged at step" in error_line(result.stderr)
    assert not (out / "model.safetensors").exists()
    assert json.loads((out / "openkd_run.json").read_text())["status"] == "diverged"


def test_a_served_teacher_must_share_the_vocabulary(
    tiny_model: Path, other_vocab: Path, data: Path, tmp_path: Path
) -> None:
    """A server scores the student's own ids: refused in one line before any request."""
    result = on_policy(
        tiny_model, other_vocab, data, tmp_path / "out",
        "--teacher-base-url", "http://127.0.0.1:9/v1",
    )  # fmt: skip
    assert result.returncode == 1
    line = error_line(result.stderr)
    assert "tokenize differently" in line and "load --teacher in the training process" in line


def test_a_distillation_only_trl_field_is_refused_across_tokenizers(
    tiny_model: Path, other_vocab: Path, data: Path, tmp_path: Path
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"train": {"sft_args": {"generation_kwargs": {"top_k": 5}}}}))
    out = tmp_path / "out"
    result = on_policy(tiny_model, other_vocab, data, out, "--config", config)
    assert result.returncode in (1, 2)
    line = error_line(result.stderr)
    assert "sft_args.generation_kwargs is not a trl.experimental.gold.GOLDConfig field" in line
    assert not (out / "model.safetensors").exists()
