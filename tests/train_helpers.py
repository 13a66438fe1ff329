"""Shared by the train tests: answered reverse-words rows, a ChatML-style chat template."""

from __future__ import annotations

# Qwen2.5-style ChatML: every turn, the last included, ends with '<|im_end|>\n'.
QWEN_STYLE = (
    "{%- for m in messages %}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def records(n: int, seed: int = 1) -> list[dict]:
    """`n` rows of the reverse-words task as `openkd generate` writes them, answered in full."""
    from openkd.tiny import make_prompts
    from openkd.tiny.tasks import reverse_words

    rows = []
    for i, prompt in enumerate(make_prompts(n, seed=seed)):
        rows.append(
            {
                "id": f"r{seed}-{i}",
                "prompt": [{"role": "user", "content": prompt}],
                "completion": [{"role": "assistant", "content": reverse_words(prompt)}],
                "finish_reason": "stop",
                "prompt_tokens": 12,
                "completion_tokens": 6,
                "source_index": i,
            }
        )
    return rows
