"""Synthetic pilots for `openkd plan` tests: runs laid out as openkd train + openkd eval write
them (config.json, openkd_run.json, trainer_state.json, report.json), with cross-entropies
drawn from the distillation law with known coefficients. No model is built or trained."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from openkd.plan.law import Distillation, Law, student_loss

# A tiny-model-sized truth: N_S ~ 1e5-1e6, D_S ~ 1e6-1e7 answer tokens.
TRUTH = Law(Distillation(A=300.0, alpha=0.35, B=2000.0, beta=0.5, gamma=0.8))
TEACHER = "tiny-teacher"
HIDDEN = (64, 128, 256)
TOKENS_PER_EPOCH = 1_000_000
EPOCHS = (1.0, 4.0, 16.0)


def llama_config(hidden: int, layers: int = 2) -> dict[str, Any]:
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": hidden // 32,
        "num_key_value_heads": max(1, hidden // 64),
        "vocab_size": 2000,
    }


def llama_params(hidden: int, layers: int = 2) -> int:
    """Non-embedding parameters of `llama_config`, counted by hand."""
    heads, kv = hidden // 32, max(1, hidden // 64)
    q, k = heads * 32, kv * 32
    per_layer = hidden * q + 2 * hidden * k + q * hidden + 3 * hidden * 2 * hidden + 2 * hidden
    return layers * per_layer + hidden


def write_pilot(
    root: Path,
    name: str,
    *,
    hidden: int,
    epochs: float,
    loss: float,
    teacher: str = TEACHER,
    status: str = "complete",
    nll: bool = True,
) -> Path:
    """One pilot as `openkd plan pilot` lays it out; returns its directory."""
    pilot = root / name
    student = pilot / "student"
    student.mkdir(parents=True)
    (student / "config.json").write_text(json.dumps(llama_config(hidden)))
    (student / "openkd_run.json").write_text(
        json.dumps(
            {
                "format": "openkd.train/1",
                "status": status,
                "results": {"trained_tokens_per_epoch": TOKENS_PER_EPOCH, "global_step": 10},
            }
        )
    )
    (student / "trainer_state.json").write_text(
        json.dumps({"epoch": epochs, "num_input_tokens_seen": int(3 * TOKENS_PER_EPOCH * epochs)})
    )
    (student / "model.safetensors").write_bytes(b"")
    metrics: dict[str, Any] = {"nll": loss} if nll else {}
    report = {
        "format": "openkd.eval/1",
        "dataset": "held-out.jsonl",
        "rows": 2,
        "config": {"student": str(student)},
        "models": {
            "teacher": {"name": teacher, "metrics": {"rows": 2}},
            "student": {"name": str(student), "metrics": metrics},
        },
    }
    (pilot / "eval").mkdir()
    (pilot / "eval" / "report.json").write_text(json.dumps(report))
    rows = [
        {"id": str(i), "prompt": [{"role": "user", "content": f"Reverse the words: a b {i}"}],
         "teacher": {"text": f"{i} b a", "finish_reason": "stop", "tokens": 3}}
        for i in range(2)
    ]  # fmt: skip
    (pilot / "eval" / "examples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return pilot


def write_grid(
    root: Path,
    *,
    hidden: tuple[int, ...] = HIDDEN,
    epochs: tuple[float, ...] = EPOCHS,
    teacher_loss: float = 0.3,
    noise: float = 0.0,
    seed: int = 0,
) -> list[Path]:
    """A sizes x budgets grid of pilots whose L_S follows TRUTH (times 1 + noise)."""
    rng = np.random.default_rng(seed)
    out = []
    for h in hidden:
        for e in epochs:
            loss = float(student_loss(TRUTH, llama_params(h), TOKENS_PER_EPOCH * e, teacher_loss))
            loss *= 1 + noise * float(rng.standard_normal())
            out.append(write_pilot(root, f"h{h}-e{e:g}", hidden=h, epochs=e, loss=loss))
    return out
