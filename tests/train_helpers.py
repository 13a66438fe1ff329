"""How the train tests build a tiny run: answered reverse-words rows (or a file of them) for
the session's `tiny_model`, the `openkd train` argv, and a ChatML-style chat template."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from tests.conftest import write_jsonl

# Qwen2.5-style ChatML: every turn, the last included, ends with '<|im_end|>\n'.
QWEN_STYLE = (
    "{%- for m in messages %}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# The settings the checkpointed CLI runs share (resume, preemption, soft labels, ZeRO-3):
# with --seed, CPU training is deterministic, so their weights compare bitwise.
TINY_RUN: Mapping[str, object] = {
    "batch_size": 10,
    "learning_rate": "1e-3",
    "logging_steps": 1,
    "max_length": 128,
    "seed": 7,
}


def records(
    n: int, seed: int = 1, *, prefix: str | None = None, tokens: tuple[int, int] = (12, 6)
) -> list[dict]:
    """`n` rows of the reverse-words task as `openkd generate` writes them, answered in full.

    Ids are `{prefix}{i}` (default `r{seed}-`); `tokens` are the recorded prompt and
    completion token counts.
    """
    from openkd.data.schema import make_record
    from openkd.tiny import make_prompts
    from openkd.tiny.tasks import reverse_words

    prefix = f"r{seed}-" if prefix is None else prefix
    return [
        # dict(): the tests edit rows freely (other keys, cut answers), not as LabelledRow
        dict(
            make_record(
                id=f"{prefix}{i}",
                prompt=[{"role": "user", "content": prompt}],
                text=reverse_words(prompt),
                finish_reason="stop",
                prompt_tokens=tokens[0],
                completion_tokens=tokens[1],
                source_index=i,
            )
        )
        for i, prompt in enumerate(make_prompts(n, seed=seed))
    ]


def write_reverse_dataset(path: Path, rows: int = 64) -> Path:
    """The train tests' labelled dataset: `rows` answered rows (prompt seed 3) at `path`."""
    return write_jsonl(path, records(rows, seed=3, prefix="r", tokens=(0, 0)))


def train_argv(
    student: str | os.PathLike[str],
    dataset: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *extra: str | os.PathLike[str],
    base: Mapping[str, object] | None = None,
    **flags: object,
) -> list[str]:
    """`openkd train` argv: the student, dataset and output dir, then `--flag value` for each
    setting of `base` (e.g. `TINY_RUN`) and `flags` (`flags` win; `max_steps=4` is
    `--max-steps 4`, True a bare flag, None none), then `extra`, which wins over both."""
    argv = ["train", "--student", str(student), "--dataset", str(dataset), "--output-dir", str(out)]
    for key, value in {**(base or {}), **flags}.items():
        if value is None:
            continue
        argv.append("--" + key.replace("_", "-"))
        if value is not True:
            argv.append(str(value))
    return [*argv, *map(str, extra)]
