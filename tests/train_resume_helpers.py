"""Shared by the resume and distributed tests: a learnable openkd dataset, weight comparison."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import write_jsonl


def write_reverse_dataset(path: Path, rows: int = 64) -> Path:
    """`rows` openkd records of the reverse-words task, as `openkd generate` writes them."""
    from openkd.data.schema import make_record
    from openkd.tiny import make_prompts
    from openkd.tiny.tasks import reverse_words

    records = [
        make_record(
            id=f"r{i}",
            prompt=[{"role": "user", "content": p}],
            text=reverse_words(p),
            finish_reason="stop",
            prompt_tokens=0,
            completion_tokens=0,
            source_index=i,
        )
        for i, p in enumerate(make_prompts(rows, seed=3))
    ]
    return write_jsonl(path, records)


def assert_same_weights(a: Path, b: Path) -> None:
    """The final students in two output dirs are bitwise equal."""
    import torch
    from safetensors.torch import load_file

    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), f"{name} differs"


def global_step(output_dir: Path) -> int:
    return json.loads((output_dir / "trainer_state.json").read_text())["global_step"]


def flat(text: str) -> str:
    """Console output with rich's line wrapping undone."""
    return " ".join(text.split())
