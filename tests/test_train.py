"""`openkd train` end to end on the tiny model: what TRL trains on, the saved student, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from unittest import mock

import pytest
import yaml

from openkd.tiny import make_prompts
from tests.conftest import run_cli, write_jsonl
from tests.helpers import error_line, invoke
from tests.train_helpers import QWEN_STYLE, records, train_argv

TEACHER = "org/teacher-72b"
EOS = "<|im_end|>"
# The learnable toy task: 60 steps at this rate take the tiny model from ~7.6 to ~3.5 and
# teach it to answer with words and then stop.
E2E_FLAGS = [
    "--max-steps", "60", "--batch-size", "8", "--learning-rate", "1e-2",
    "--lr-scheduler-type", "constant", "--warmup-ratio", "0",
    "--logging-steps", "10", "--save-steps", "30",
]  # fmt: skip


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """64 answered rows plus one truncated and one empty, with generate's metadata beside it."""
    root = tmp_path_factory.mktemp("data")
    rows = records(64)
    cut = {**records(1, seed=9)[0], "id": "cut", "finish_reason": "length"}
    empty = {**records(1, seed=8)[0], "id": "empty"}
    empty["completion"] = [{"role": "assistant", "content": ""}]
    path = write_jsonl(root / "teacher.jsonl", [*rows[:10], cut, *rows[10:], empty])
    meta = {"teacher": {"name": TEACHER, "backend": "mock"}, "sampling": {"temperature": 0.0}}
    (root / "teacher.meta.json").write_text(json.dumps(meta))
    return path


@pytest.fixture(scope="module")
def e2e(tiny_model, dataset, tmp_path_factory):
    """One real `openkd train` in a fresh process, as a user runs it."""
    out = tmp_path_factory.mktemp("e2e") / "student"
    proc = run_cli(
        *train_argv(tiny_model, dataset, out, *E2E_FLAGS), timeout=600, env={"OMP_NUM_THREADS": "1"}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, out


@pytest.mark.slow
def test_cli_end_to_end_saves_a_student_that_stops(e2e, tiny_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    proc, out = e2e
    assert proc.stdout.strip().splitlines() == [str(out)]  # only the model path on stdout
    for name in ("model.safetensors", "tokenizer.json", "chat_template.jinja", "openkd_train.yaml"):
        assert (out / name).is_file(), name
    assert not (out / "pytorch_model.bin").exists()

    # Pre-flight output: the example with its trained part marked, and the EOS agreement.
    assert "⟦" in proc.stderr and f"{EOS}⟧" in proc.stderr
    assert f"end-of-turn '{EOS}' (id 2) = tokenizer eos" in proc.stderr
    assert "skipped: truncated / empty" in proc.stderr

    generation = GenerationConfig.from_pretrained(out)
    assert (generation.eos_token_id, generation.pad_token_id) == (2, 0)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.eos_token == EOS and tokenizer.chat_template

    card = (out / "README.md").read_text()
    assert TEACHER in card and "Final training loss" in card and "Training examples: 64" in card
    assert "Skipped (answer truncated at the teacher's limit, or empty): 2" in card
    resolved = yaml.safe_load((out / "openkd_train.yaml").read_text())["train"]
    assert resolved["max_steps"] == 60 and resolved["learning_rate"] == 0.01

    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert len(losses) >= 6 and losses[-1] < 0.6 * losses[0], losses
    run = json.loads((out / "openkd_run.json").read_text())
    assert run["status"] == "complete" and run["results"]["global_step"] == 60

    model = AutoModelForCausalLM.from_pretrained(out)
    for prompt in make_prompts(3, seed=99):
        enc = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
        with torch.inference_mode():
            generated = model.generate(**enc, max_new_tokens=24, do_sample=False)
        new = generated[0, enc["input_ids"].shape[1] :].tolist()
        assert new[-1] == 2 and len(new) < 24, tokenizer.decode(new)  # stopped at EOS
        assert tokenizer.decode(new[:-1]).strip(), "answered with nothing but EOS"


def test_trl_trains_on_the_answer_and_eos_only(tiny_model, dataset, tmp_path):
    from openkd.config import resolve
    from openkd.train.config import TrainConfig
    from openkd.train.prepare import build_trainer, prepare

    cfg = resolve(
        TrainConfig,
        None,
        {"student": str(tiny_model), "dataset": str(dataset), "output_dir": tmp_path / "o"},
    )
    trainer = build_trainer(prepare(cfg, str(tiny_model)))
    tokenizer = trainer.processing_class
    rows = [trainer.train_dataset[i] for i in range(4)]
    batch = trainer.data_collator(rows)
    for i, row in enumerate(rows):
        labels = batch["labels"][i]
        trained = batch["input_ids"][i][labels != -100].tolist()
        assert tokenizer.decode(trained) == row["completion"][0]["content"] + EOS
        prompt_text = row["prompt"][0]["content"]
        assert prompt_text not in tokenizer.decode(trained)
    stats = trainer.prepared["train"]
    assert (stats.rows_in, stats.examples, stats.cut, stats.trimmed) == (64, 64, 0, 0)


def test_template_newline_after_eos_is_not_trained(tiny_model, dataset, tmp_path):
    from openkd.config import resolve
    from openkd.train.config import TrainConfig
    from openkd.train.prepare import build_trainer, prepare

    template = tmp_path / "qwen_style.jinja"
    template.write_text(QWEN_STYLE)
    cfg = resolve(
        TrainConfig,
        None,
        {
            "student": str(tiny_model),
            "dataset": str(dataset),
            "output_dir": tmp_path / "o",
            "chat_template": str(template),
            "max_samples": 8,
        },
    )
    prepared = prepare(cfg, str(tiny_model))
    assert prepared.eot.trailing == "\n"
    trainer = build_trainer(prepared)
    assert trainer.prepared["train"].trimmed == 8
    for row in trainer.train_dataset:
        assert row["input_ids"][-1] == 2  # every example ends exactly at EOS
        trained = [t for t, lab in zip(row["input_ids"], row["labels"], strict=True) if lab != -100]
        assert trainer.processing_class.decode(trained) == row["completion"][0]["content"] + EOS


@pytest.mark.slow
def test_rerun_with_other_settings_is_refused(tiny_model, dataset, tmp_path):
    out = tmp_path / "out"
    args = train_argv(tiny_model, dataset, out, max_steps=1, batch_size=2, save_steps=1)
    code, _, err = invoke(*args)
    assert code == 0, err[-3000:]
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    code, _, err = invoke(*args, "--learning-rate", "5e-3")
    line = error_line(err)
    assert code == 1
    assert "holds a different run" in line and "learning_rate 2e-05 (now 0.005)" in line
    assert "--overwrite" in line
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # untouched
    # --overwrite replaces the earlier run instead of resuming its checkpoint.
    code, _, err = invoke(*args, "--learning-rate", "5e-3", "--overwrite")
    assert code == 0, err[-3000:]
    assert "--overwrite: removing" in err and "resuming from" not in err
    record = json.loads((out / "openkd_run.json").read_text())
    assert record["identity"]["settings"]["learning_rate"] == 0.005


def broken_student(tiny_model: Path, tmp_path: Path, *, eos: str | None = None) -> Path:
    student = tmp_path / "student"
    shutil.copytree(tiny_model, student)
    if eos is None:
        (student / "chat_template.jinja").unlink()
    else:
        config = json.loads((student / "tokenizer_config.json").read_text())
        config["eos_token"] = eos
        (student / "tokenizer_config.json").write_text(json.dumps(config))
    return student


def test_eos_token_flag_fixes_a_student_whose_eos_is_not_the_end_of_turn(
    tiny_model, dataset, tmp_path
):
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    # Like a base model: tokenizer, config and generation_config all stop on <|endoftext|>.
    student = broken_student(tiny_model, tmp_path, eos="<|endoftext|>")
    for name in ("config.json", "generation_config.json"):
        settings = json.loads((student / name).read_text())
        settings["eos_token_id"] = 0
        (student / name).write_text(json.dumps(settings))
    out = tmp_path / "out"
    code, _, err = invoke(
        *train_argv(student, dataset, out, eos_token=EOS, max_steps=1, batch_size=2, save_steps=1)
    )
    assert code == 0, err[-3000:]
    assert AutoTokenizer.from_pretrained(out).eos_token == EOS
    assert 2 in GenerationConfig.from_pretrained(out).eos_token_id
    assert AutoConfig.from_pretrained(out).eos_token_id == 2


def test_eos_mismatch_is_an_error_with_the_fix(tiny_model, dataset, tmp_path):
    student = broken_student(tiny_model, tmp_path, eos="<|endoftext|>")
    out = tmp_path / "out"
    code, _, err = invoke(*train_argv(student, dataset, out))
    line = error_line(err)
    assert code == 1
    assert f"the chat template ends assistant turns with '{EOS}' (id 2)" in line
    assert "tokenizer's eos is '<|endoftext|>' (id 0)" in line
    assert f"--eos-token '{EOS}'" in line
    assert not (out / "model.safetensors").exists()


@pytest.mark.parametrize(
    "case,expected",
    [
        ("not_openkd", r"has no 'completion' column .*openkd generate"),
        ("student_missing", r"--student \S+: no such directory"),
        (
            "all_filtered",
            r"0 usable rows in --dataset \S+: all 2 rows were filtered out \(1 truncated .* 1 empty "
            r".*--keep-truncated",
        ),
        ("max_length", r"--max-length 8 is shorter than every prompt .*longest \d+ tokens"),
        ("no_template", r"has no chat template .*--chat-template FILE"),
        ("template_missing", r"--chat-template \S+: no such file"),
    ],
)
def test_errors_are_one_line_and_leave_nothing_behind(
    case, expected, tiny_model, dataset, tmp_path
):
    student, data, extra = tiny_model, dataset, []
    if case == "not_openkd":
        data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in make_prompts(3)])
    elif case == "student_missing":
        student = tmp_path / "no-such-model"
    elif case == "all_filtered":
        rows = records(2)
        rows[0]["finish_reason"] = "length"
        rows[1]["completion"][0]["content"] = " "
        data = write_jsonl(tmp_path / "filtered.jsonl", rows)
    elif case == "max_length":
        extra = ["--max-length", "8"]
    elif case == "no_template":
        student = broken_student(tiny_model, tmp_path)
    elif case == "template_missing":
        extra = ["--chat-template", tmp_path / "missing.jinja"]
    out = tmp_path / "out"
    code, stdout, err = invoke(*train_argv(student, data, out, *extra))
    import re

    assert code == 1
    assert re.search(expected, error_line(err)), error_line(err)
    assert stdout == ""
    assert not out.exists()


def test_unknown_sft_arg_is_a_config_error(tiny_model, dataset, tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text("train:\n  sft_args:\n    max_grad_nrom: 0.5\n")
    code, _, err = invoke(*train_argv(tiny_model, dataset, tmp_path / "out", config=config))
    assert code == 2
    assert "sft_args.max_grad_nrom is not a trl.SFTConfig field" in error_line(err)
    assert "did you mean 'max_grad_norm'" in error_line(err)


@pytest.mark.slow
def test_lora_adapter_and_merged_model_load(tiny_model, dataset, tmp_path):
    import torch
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    code, stdout, err = invoke(
        *train_argv(
            tiny_model, dataset, out, lora=True, merge_lora=True, lora_r=4, max_steps=3,
            batch_size=4, learning_rate="1e-2", save_steps=3,
        )
    )  # fmt: skip
    assert code == 0, err[-3000:]
    assert stdout.strip() == str(out / "merged")
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert not (out / "model.safetensors").exists()
    assert "library_name: peft" in (out / "README.md").read_text()
    assert "library_name: transformers" in (out / "merged" / "README.md").read_text()

    adapter = AutoPeftModelForCausalLM.from_pretrained(out).eval()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    ids = torch.tensor([[1, 508, 259, 201, 74, 75, 2, 201, 1, 67]])
    with torch.inference_mode():
        a, m, b = (model(ids).logits for model in (adapter, merged, base))
    assert torch.allclose(a, m, atol=1e-4)
    assert not torch.allclose(m, b, atol=1e-4)  # the adapter changed something
    assert merged.generation_config.eos_token_id == 2


@pytest.mark.slow
def test_push_failure_keeps_the_model_and_a_rerun_retries(tiny_model, dataset, tmp_path):
    out = tmp_path / "pushed"
    args = train_argv(
        tiny_model, dataset, out,
        max_steps=2, batch_size=4, save_steps=2, push_to_hub="org/student", private=True,
    )  # fmt: skip
    with mock.patch("huggingface_hub.HfApi") as api_cls:
        api = api_cls.return_value
        api.upload_folder.side_effect = RuntimeError("503 Server Error (token hf_secretsecret123)")
        code, stdout, err = invoke(*args)
    line = error_line(err)
    assert code == 1
    assert "push to org/student failed" in line and "rerun the same command" in line
    assert f"the student is saved in {out}" in line
    assert "hf_secretsecret123" not in err
    assert (out / "model.safetensors").is_file() and stdout == ""

    with mock.patch("huggingface_hub.HfApi") as api_cls:
        api = api_cls.return_value
        api.create_repo.return_value.url = "https://huggingface.co/org/student"
        code, stdout, err = invoke(*args)
    assert code == 0, err[-3000:]
    assert stdout.strip() == str(out)
    assert "0 in this run" in err  # training was complete: only the push was redone
    api.create_repo.assert_called_once_with(
        "org/student", repo_type="model", private=True, exist_ok=True
    )
    kwargs = api.upload_folder.call_args.kwargs
    assert kwargs["folder_path"] == str(out) and kwargs["repo_id"] == "org/student"
    assert "checkpoint-*" in kwargs["ignore_patterns"]
    assert "# org/student" in (out / "README.md").read_text()


def test_packed_sequences_do_not_attend_across_examples(tiny_model):
    """What --packing relies on off flash-attention: position_ids restart = separate examples."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    a, b = [1, 508, 259, 201, 74, 75, 2], [1, 67, 439, 75, 335]
    packed = torch.tensor([a + b])
    positions = torch.tensor([list(range(len(a))) + list(range(len(b)))])
    with torch.inference_mode():
        # As in training (TRL passes use_cache=False): with a cache, no packing is detected.
        together = model(input_ids=packed, position_ids=positions, use_cache=False).logits[0]
        alone = torch.cat([model(torch.tensor([a])).logits[0], model(torch.tensor([b])).logits[0]])
        one_sequence = model(input_ids=packed, use_cache=False).logits[0]
    assert torch.allclose(together, alone, atol=1e-4)
    assert not torch.allclose(one_sequence[len(a) :], alone[len(a) :], atol=1e-4)


@pytest.mark.slow
def test_packing_with_eval_split_trains(tiny_model, dataset, tmp_path):
    out = tmp_path / "packed"
    code, _, err = invoke(
        *train_argv(
            tiny_model, dataset, out, packing=True, max_length=96, batch_size=2, max_steps=3,
            save_steps=3, eval_fraction="0.1", gradient_checkpointing=True,
        )
    )  # fmt: skip
    assert code == 0, err[-3000:]
    assert (
        "--packing: TRL's bfd packing trains padding-free; flash-attention does not run on CPU"
        in err
    )
    assert "packed rows" in err
    results = json.loads((out / "openkd_run.json").read_text())["results"]
    assert results["global_step"] == 3 and results["eval_loss"] is not None
    assert results["train_examples"] == 58  # 64 answered rows, 6 held out
    assert "Final evaluation loss" in (out / "README.md").read_text()
