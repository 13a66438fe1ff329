"""The student's model card (README.md): teacher, data, settings and results, Hub-ready.

Built only from the resolved config and run results, which hold no secrets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from openkd.data.teacher import DatasetTeacher


@dataclass(frozen=True)
class CardInfo:
    student: str  # what was fine-tuned: path or Hub id
    dataset: str
    teacher: DatasetTeacher | None
    settings: dict[str, Any]
    train_rows: int
    eval_rows: int
    skipped_rows: int
    trained_tokens: int
    steps: int
    final_loss: float | None
    eval_loss: float | None
    lora: bool
    merged: bool = False
    repo_id: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    # How the student learned, replacing the hard-label sentence (e.g. on-policy distillation)
    method: str | None = None
    extra_tags: tuple[str, ...] = ()
    extra_results: tuple[str, ...] = ()
    curves: str | None = None  # the training curves PNG beside the card, by file name


def _is_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~"))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def render_card(info: CardInfo, *, adapter: bool | None = None) -> str:
    """Markdown with YAML metadata. `adapter`: this card sits beside LoRA adapter weights."""
    adapter = info.lora and not info.merged if adapter is None else adapter
    teacher = info.teacher["name"] if info.teacher else "unknown"
    header: dict[str, Any] = {
        "library_name": "peft" if adapter else "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["openkd", "distillation", "trl"]
        + (list(info.extra_tags) if info.method else ["sft"])
        + (["lora"] if info.lora else []),
    }
    if _is_hub_id(info.student):
        header["base_model"] = info.student
    if _is_hub_id(info.dataset):
        header["datasets"] = [info.dataset]
    name = info.repo_id or "Distilled student"
    revision = info.teacher.get("revision") if info.teacher else None
    what = "a LoRA adapter for" if adapter else "a fine-tune of"
    load = (
        "from peft import AutoPeftModelForCausalLM\n"
        f'model = AutoPeftModelForCausalLM.from_pretrained("{info.repo_id or "<this folder>"}")'
        if adapter
        else "from transformers import AutoModelForCausalLM\n"
        f'model = AutoModelForCausalLM.from_pretrained("{info.repo_id or "<this folder>"}")'
    )
    lines = [
        "---",
        yaml.safe_dump(header, sort_keys=False).rstrip(),
        "---",
        "",
        f"# {name}",
        "",
        f"{what.capitalize()} `{info.student}`, distilled from the teacher **{teacher}**"
        + (f" (revision `{revision}`)" if revision else "")
        + (
            f" with openkd {info.method}"
            if info.method
            else " with openkd hard-label distillation: the student was "
            "trained with TRL SFT on the teacher's greedy answers, loss on the answer tokens only."
        ),
        "",
        "## Data",
        "",
        f"- Dataset: `{info.dataset}`",
        f"- Teacher: `{teacher}`",
        f"- Training examples: {_fmt(info.train_rows)}"
        + (f", held out for evaluation: {_fmt(info.eval_rows)}" if info.eval_rows else ""),
        f"- Skipped (answer truncated at the teacher's limit, or empty): {_fmt(info.skipped_rows)}",
        *(
            []
            if info.method
            else [f"- Answer tokens trained on per epoch: {_fmt(info.trained_tokens)}"]
        ),
        "",
        "## Training",
        "",
        "| setting | value |",
        "|---|---|",
    ]
    lines += [f"| {key} | {_fmt(value)} |" for key, value in info.settings.items()]
    lines += [
        "",
        "## Results",
        "",
        f"- Optimizer steps: {_fmt(info.steps)}",
        f"- Final training loss: {_fmt(info.final_loss) if info.final_loss is not None else 'n/a'}",
    ]
    if info.eval_loss is not None:
        lines.append(f"- Final evaluation loss: {_fmt(info.eval_loss)}")
    lines += [f"- {line}" for line in info.extra_results]
    if info.curves:
        lines += ["", f"![Training curves: loss against step]({info.curves})"]
    lines += ["", "## Use", "", "```python", load, "```", ""]
    if info.versions:
        lines += [
            "## Framework versions",
            "",
            *[f"- {name}: {version}" for name, version in info.versions.items()],
            "",
        ]
    lines += [
        "The resolved `openkd train` settings are in `openkd_train.yaml`; rerun with "
        "`openkd train --config openkd_train.yaml` to reproduce.",
        "",
    ]
    return "\n".join(lines)
