"""Helpers for the cross-tokenizer proof: a teacher that has learned the toy task, its greedy
answers and top-K as `openkd generate --logprobs` stores them, and held-out scores of students
on the positions the alignment gives a target."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.conftest import write_jsonl
from tests.helpers import invoke

TEACHER_TRAIN = (
    "--batch-size", "32", "--max-length", "64", "--learning-rate", "2e-3",
    "--lr-scheduler-type", "constant_with_warmup", "--warmup-ratio", "0.05",
    "--save-steps", "1000",
)  # fmt: skip


def records(prompts: list[str], answers: list[str], prefix: str) -> list[dict[str, Any]]:
    """openkd JSONL rows (as generate writes them) for prompts and answers."""
    from openkd.data.schema import make_record

    out = []
    for i, (p, a) in enumerate(zip(prompts, answers, strict=True)):
        out.append(
            make_record(
                id=f"{prefix}{i}",
                prompt=[{"role": "user", "content": p}],
                text=a,
                finish_reason="stop",
                prompt_tokens=0,
                completion_tokens=0,
                source_index=i,
            )
        )
    return out


def trained_teacher(work: Path, prompts: list[str], steps: int) -> Path:
    """make-tiny seed 0 trained on the mock teacher's reverse-the-words answers."""
    from openkd.tiny import build_tiny_model
    from openkd.tiny.tasks import reverse_words

    init = build_tiny_model(work / "teacher-init")
    data = work / "mock.jsonl"
    write_jsonl(data, records(prompts, [reverse_words(p) for p in prompts], "m"))
    result = invoke(
        "train", "--student", init, "--dataset", data, "--output-dir", work / "teacher",
        "--max-steps", str(steps), *TEACHER_TRAIN,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return work / "teacher"


def greedy_answers(model_dir: Path, prompts: list[str], max_new_tokens: int = 24) -> list[str]:
    """Each prompt's greedy answer (chat template, generation prompt), batched, left-padded."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
        )
        for p in prompts
    ]
    out: list[str] = []
    for start in range(0, len(texts), 64):
        batch = tokenizer(texts[start : start + 64], return_tensors="pt", padding=True)
        with torch.inference_mode():
            ids = model.generate(
                **batch, max_new_tokens=max_new_tokens, do_sample=False,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            )  # fmt: skip
        for row in ids[:, batch["input_ids"].shape[1] :]:
            out.append(tokenizer.decode(row, skip_special_tokens=True))
    return out


def aligned_scores(
    student_dir: Path, teacher_dir: Path, rows: list[dict[str, Any]], sidecar: Path
) -> dict[str, float]:
    """Held-out KL(teacher || student) over the positions with an exact or merged target
    (the training loss's buckets, T = 1), their coverage, and whole-answer exact agreement
    (the student's greedy answer is the teacher's)."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from openkd.data.logprobs import SidecarReader
    from openkd.distill.crosstok.aligner import Aligner
    from openkd.distill.crosstok.targets import EXACT, MERGED
    from openkd.distill.kd import kd_terms

    student_tok = AutoTokenizer.from_pretrained(student_dir)
    aligner = Aligner(
        AutoTokenizer.from_pretrained(teacher_dir), student_tok, "gold", student_tok.eos_token_id
    )
    model = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    reader = SidecarReader([sidecar])
    kl_sum, kl_n, positions = 0.0, 0, 0
    for row in rows:
        stored = reader[row["id"]]
        answer = row["completion"][0]["content"]
        aligned = aligner.align(stored.token_ids, stored.top_ids, stored.top_logprobs, answer)
        prompt = student_tok.apply_chat_template(
            row["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        answer_ids = [*aligned.student_ids, student_tok.eos_token_id]
        ids = torch.tensor([list(prompt) + answer_ids])
        with torch.inference_mode():
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1]
        t = aligned.targets
        keep = np.isin(t.kind, (EXACT, MERGED))
        positions += len(t.kind)
        if not keep.any():
            continue
        valid = torch.from_numpy(np.isfinite(t.logprobs[keep]))
        top_ids = torch.from_numpy(t.ids[keep])
        top_ids = torch.where(valid, top_ids, top_ids[:, :1])
        terms = kd_terms(
            logits[torch.from_numpy(keep)], torch.tensor(answer_ids)[torch.from_numpy(keep)],
            top_ids, torch.from_numpy(t.logprobs[keep]), valid=valid,
        )  # fmt: skip
        kl_sum += float(terms.kl.sum())
        kl_n += int(keep.sum())
    answers = greedy_answers(student_dir, [r["prompt"][0]["content"] for r in rows])
    agree = [
        a.strip() == r["completion"][0]["content"].strip()
        for a, r in zip(answers, rows, strict=True)
    ]
    return {
        "kl": kl_sum / max(kl_n, 1),
        "coverage": kl_n / max(positions, 1),
        "exact_match": float(np.mean(agree)),
        "rows": len(rows),
    }
