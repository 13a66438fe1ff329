"""How the train tests check a run: its final weights against another's, its step count,
its console output unwrapped. (Building one: `tests.train_helpers`.)"""

from __future__ import annotations

import json
from pathlib import Path


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
