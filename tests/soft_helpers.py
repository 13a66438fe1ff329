"""A soft-label sidecar for an openkd JSONL, written offline from a (tiny) model's own top-K.

For tests and benchmarks that must not depend on `openkd generate`: each row's answer is
tokenised (plus the end-of-turn token) as if the teacher had produced those ids, and the
"teacher" is run teacher-forced on the prompt (its chat template with the generation prompt)
followed by those ids; its top-K log-probabilities at each answer position go to the sidecar
with `SidecarWriter`, as generate will write them.

Also the model copies the soft-label tests use as teachers: a sharper one, one whose
tokenizer disagrees with the student's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any


def write_teacher_logprobs(
    teacher: str | Path,
    jsonl: str | Path,
    *,
    k: int = 8,
    dtype: str = "float16",
    batch_size: int = 16,
    rows_per_commit: int = 32,
    teacher_name: str | None = None,
) -> Path:
    """Write `<stem>.logprobs/` beside `jsonl` from `teacher`'s top-k; the sidecar directory.

    `teacher_name` is also recorded as the teacher in `<stem>.meta.json` (created or updated),
    as `openkd generate` records it.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from openkd.data.jsonl import iter_jsonl
    from openkd.data.logprobs import SidecarWriter, sidecar_dir

    jsonl = Path(jsonl)
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    eos = tokenizer.eos_token_id
    rows = [row for _, row in iter_jsonl(jsonl)]
    out = sidecar_dir(jsonl)
    with SidecarWriter(out, k, dtype, meta={"teacher": str(teacher_name or teacher)}) as writer:
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            encoded = [_encode(tokenizer, row, eos) for row in batch]
            length = max(len(p) + len(c) for p, c in encoded)
            ids = torch.full((len(batch), length), tokenizer.pad_token_id or 0)
            mask = torch.zeros((len(batch), length), dtype=torch.long)
            for i, (p, c) in enumerate(encoded):
                ids[i, : len(p) + len(c)] = torch.tensor(p + c)
                mask[i, : len(p) + len(c)] = 1
            with torch.inference_mode():
                logprobs = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits, -1)
            for i, (row, (p, c)) in enumerate(zip(batch, encoded, strict=True)):
                top = logprobs[i, len(p) - 1 : len(p) + len(c) - 1].topk(k, -1)
                writer.add(row["id"], c, top.indices.numpy(), top.values.numpy())
                if writer.pending >= rows_per_commit:
                    writer.commit()
    if teacher_name is not None:
        meta_path = jsonl.with_suffix("").with_name(jsonl.with_suffix("").name + ".meta.json")
        meta: dict[str, Any] = {}
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        meta["teacher"] = {**(meta.get("teacher") or {}), "name": teacher_name}
        meta_path.write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return out


def sharper_copy(model_dir: Path, out: Path, factor: float) -> Path:
    """The same tokenizer, weights scaled: a more confident 'teacher'."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, out)
    weights = load_file(out / "model.safetensors")
    save_file({k: v * factor for k, v in weights.items()}, out / "model.safetensors")
    return out


def swap_two_tokens(model_dir: Path, out: Path) -> Path:
    """A copy whose tokenizer gives two ordinary tokens each other's id."""
    shutil.copytree(model_dir, out)
    spec = json.loads((out / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    (out / "tokenizer.json").write_text(json.dumps(spec))
    return out


_swap_two_tokens = swap_two_tokens  # the name it had in test_train_soft


def _encode(tokenizer: Any, row: dict[str, Any], eos: int) -> tuple[list[int], list[int]]:
    prompt = tokenizer.apply_chat_template(
        row["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    answer = "".join(m["content"] for m in row["completion"])
    return list(prompt), tokenizer(answer, add_special_tokens=False)["input_ids"] + [eos]
