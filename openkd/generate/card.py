"""The dataset card: a human-readable account of `<stem>.meta.json`, Hub-ready.

Everything on it comes from the metadata (which holds no secrets). The YAML header tells the
Hub which uploaded files are which split.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import yaml

from openkd.data.jsonl import write_text_atomic

if TYPE_CHECKING:
    from openkd.data.layout import OutputFiles
    from openkd.data.metadata import GenerateMeta


def _fmt(n: Any) -> str:
    return f"{n:,}" if isinstance(n, int) else str(n)


def _soft_labels(meta: GenerateMeta, name: str) -> list[str]:
    """With --logprobs K: what the sidecar holds and how a student learns from it."""
    soft = meta.logprobs
    if not soft:
        return []
    return [
        f"With the teacher's top-{soft['k']} log-probabilities for every answer token "
        f"({soft['dtype']}, in `{name}.logprobs/`, keyed by row `id`): soft labels for "
        "`openkd train --loss mix` (or `--loss soft`), or `openkd export` for other trainers.",
        "",
    ]


def write_card(files: OutputFiles, meta: GenerateMeta) -> None:
    write_text_atomic(files.card, render_card(meta, name=files.stem.name))


def render_card(meta: GenerateMeta, *, name: str, repo_id: str | None = None) -> str:
    """Markdown for the output called `name` (its file stem), or for Hub repo `repo_id`."""
    counts = meta.counts
    kept = counts.kept
    teacher = meta.teacher
    sampling = meta.sampling
    source = meta.source
    versions = meta.versions
    splits = [{"split": "train", "path": "data/train-*"}]
    if counts.eval.rows:
        splits.append({"split": "test", "path": "data/test-*"})
    header = {
        "tags": ["openkd", "distillation", "synthetic"],
        "task_categories": ["text-generation"],
        "configs": [{"config_name": "default", "data_files": splits}],
    }
    revision = f" (revision `{teacher['revision']}`)" if teacher.get("revision") else ""
    decoding = "greedy" if sampling.get("temperature") == 0 else "sampled (temperature > 0)"
    lines = [
        "---",
        yaml.safe_dump(header, sort_keys=False).rstrip(),
        "---",
        "",
        f"# {repo_id or name}",
        "",
        f"Teacher answers from **{teacher.get('name')}**{revision}, {decoding}, written by "
        f"openkd {versions.get('openkd', '')} with the "
        f"`{teacher.get('backend')}` backend, for distillation: fine-tune a student "
        "on the `completion` given the `prompt` (`openkd train --dataset ...`).",
        "",
        *_soft_labels(meta, name),
        "## Contents",
        "",
        "| split | rows | prompt tokens | completion tokens |",
        "|---|---:|---:|---:|",
    ]
    for kind, label in (("train", "train"), ("eval", "test (held out)")):
        c = counts.of(kind)
        if c.rows or kind == "train":
            lines.append(
                f"| {label} | {_fmt(c.rows)} | {_fmt(c.prompt_tokens)} | "
                f"{_fmt(c.completion_tokens)} |"
            )
    lines += [
        f"| **total** | {_fmt(kept.rows)} | {_fmt(kept.prompt_tokens)} | "
        f"{_fmt(kept.completion_tokens)} |",
        "",
    ]
    truncated = counts.truncated.rows
    failed = counts.failed
    if truncated:
        lines.append(
            f"{_fmt(truncated)} answers cut at {sampling.get('max_new_tokens')} tokens or empty "
            "were left out (kept locally in `*.truncated.jsonl`)."
        )
    if failed:
        lines.append(
            f"{_fmt(failed)} prompts failed and are missing; rerunning the same "
            "`openkd generate` command retries them."
        )
    checked = meta.verification
    if checked:
        rates = ", ".join(f"{k} {v:.1%}" for k, v in checked.items() if k.startswith("pass@") and v)
        lines.append(
            f"Every answer's final answer was checked against the gold answer "
            f"({checked['method']}{', math-verify' if checked['method'] == 'math' else ''}): "
            f"{_fmt(checked['verified'])} of {_fmt(checked['answers'])} answers to "
            f"{_fmt(checked['prompts'])} prompts verified ({rates}); "
            + (
                "all are kept, each with its verdict."
                if checked.get("keep") == "all"
                else f"the {_fmt(counts.rejected.rows)} that did not are left out "
                "(kept locally in `*.rejected.jsonl`)."
            )
        )
    if truncated or failed or checked:
        lines.append("")
    lines += [
        "## Decoding",
        "",
        "```json",
        json.dumps(sampling, indent=2),
        "```",
        "",
        "## Source",
        "",
        f"- dataset: `{source.get('dataset')}`"
        + (f", subset `{source['subset']}`" if source.get("subset") else "")
        + f", split `{source.get('split')}`",
    ]
    for key, label in (
        ("prompt_column", "prompt column"),
        ("messages_column", "messages column"),
        ("prompt_template", "prompt template"),
        ("system_prompt", "system prompt"),
        ("max_samples", "max samples"),
        ("shuffle_seed", "shuffle seed"),
        ("shard", "shard"),
        ("eval_fraction", "eval fraction"),
    ):
        if source.get(key) not in (None, 0, 0.0):
            lines.append(f"- {label}: `{source[key]}`")
    lines += [
        "",
        "## Format",
        "",
        "One JSON object per row, TRL's conversational prompt/completion format plus provenance:",
        "`id` (hash of prompt, teacher and decoding settings), `prompt` and `completion` "
        "(lists of `{role, content}`), `finish_reason`, `prompt_tokens`, `completion_tokens`, "
        "`source_index` (row of the source dataset).",
        "",
        "```python",
        "from datasets import load_dataset",
        "",
        f'ds = load_dataset("{repo_id}", split="train")'
        if repo_id
        else f'ds = load_dataset("json", data_files="{name}.jsonl", split="train")',
        "```",
        "",
        "## Provenance",
        "",
        f"- generated: {meta.started_at} to {meta.finished_at or 'running'}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())),
        "- full settings and run history: `" + name + ".meta.json`",
        "",
    ]
    return "\n".join(lines)
