"""`<output_dir>/openkd_run.json`: which run an output directory belongs to.

Written when a run starts: the student, a fingerprint of the rows trained on, and the settings
that change what a checkpoint means (learning rate, batch, template...). A rerun with the same
identity resumes from the directory's checkpoints; a different one is refused unless
`--overwrite`, so a checkpoint of one run is never resumed into another. Settings that do not
change the trajectory so far (steps, epochs, logging, saving, hub) may change between reruns.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from openkd import __version__
from openkd.data.jsonl import read_json_object, write_text_atomic
from openkd.errors import OpenkdError
from openkd.paths import check_writable
from openkd.train.checkpoints import list_checkpoints

if TYPE_CHECKING:
    from openkd.train.config import TrainConfig

RUN_FILE = "openkd_run.json"
IDENTITY_SETTINGS = (
    "seed",
    "learning_rate",
    "lr_scheduler_type",
    "warmup_ratio",
    "weight_decay",
    "batch_size",
    "gradient_accumulation_steps",
    "max_length",
    "packing",
    "keep_truncated",
    "eval_fraction",
    "lora",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "eos_token",
    "sft_args",
)
# What a finished run writes at the top of its output directory.
ARTIFACTS = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "adapter_model.safetensors",
    "adapter_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "training_args.bin",
    "trainer_state.json",
    "README.md",
    "openkd_train.yaml",
    RUN_FILE,
)


def identity(cfg: TrainConfig, *, student: str, dataset_fingerprint: str, template: str) -> dict:
    """What must match for a rerun to continue this directory's run."""
    settings: dict[str, Any] = {key: getattr(cfg, key) for key in IDENTITY_SETTINGS}
    if cfg.soft_labels:  # absent for hard labels, so runs of earlier versions still match
        settings.update(loss=cfg.loss, kd_alpha=cfg.alpha, kd_temperature=cfg.temperature)
    settings["chat_template_sha256"] = hashlib.sha256(template.encode("utf-8")).hexdigest()[:16]
    return {"student": student, "dataset_fingerprint": dataset_fingerprint, "settings": settings}


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable differences between two identities (empty when they match)."""
    diffs = []
    if old.get("student") != new["student"]:
        diffs.append(f"student {old.get('student')!r} (now {new['student']!r})")
    if old.get("dataset_fingerprint") != new["dataset_fingerprint"]:
        diffs.append("the dataset rows differ")
    old_s, new_s = old.get("settings") or {}, new["settings"]
    for key in sorted(set(old_s) | set(new_s)):
        if json.dumps(old_s.get(key), sort_keys=True) != json.dumps(new_s.get(key), sort_keys=True):
            diffs.append(f"{key} {old_s.get(key)!r} (now {new_s.get(key)!r})")
    return diffs


def checkpoints_in(output_dir: Path) -> list[Path]:
    return [ckpt.path for ckpt in list_checkpoints(output_dir)]


def read_run(output_dir: Path) -> dict[str, Any] | None:
    fix = "pass --overwrite to start this output dir afresh"
    return read_json_object(output_dir / RUN_FILE, fix)


def check_output_dir_usable(output_dir: Path) -> None:
    """Cheap check before anything heavy: --output-dir can be created and written."""
    if output_dir.exists() and not output_dir.is_dir():
        raise OpenkdError(f"--output-dir {output_dir} is a file; pass a directory")
    check_writable(output_dir, "--output-dir")


def check_output_dir(output_dir: Path, new: dict[str, Any], *, overwrite: bool) -> bool:
    """Refuse an output dir holding another run; True when it holds this run already."""
    if overwrite:
        return False
    fix = "pass --overwrite to replace it, or choose another --output-dir"
    old = read_run(output_dir)
    if old is None:
        leftovers = checkpoints_in(output_dir) or [
            p
            for p in (output_dir / "config.json", output_dir / "adapter_config.json")
            if p.exists()
        ]
        if leftovers:
            raise OpenkdError(
                f"--output-dir {output_dir} already holds {leftovers[0].name} but no {RUN_FILE}, "
                f"so openkd cannot tell which run it belongs to; {fix}"
            )
        return False
    diffs = differences(old.get("identity") or {}, new)
    if diffs:
        shown = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
        raise OpenkdError(f"--output-dir {output_dir} holds a different run ({shown}); {fix}")
    return True


def clear_output_dir(output_dir: Path) -> list[str]:
    """Remove what an earlier run left (checkpoints, final student, merged model); names removed."""
    removed = []
    for ckpt in checkpoints_in(output_dir):
        shutil.rmtree(ckpt)
        removed.append(ckpt.name)
    for name in ("merged", "runs"):
        if (output_dir / name).is_dir():
            shutil.rmtree(output_dir / name)
            removed.append(name)
    for name in ARTIFACTS:
        if (output_dir / name).is_file():
            (output_dir / name).unlink()
            removed.append(name)
    for shard in output_dir.glob("model-*-of-*.safetensors") if output_dir.is_dir() else []:
        shard.unlink()
        removed.append(shard.name)
    return removed


def write_run(output_dir: Path, new: dict[str, Any], **fields: Any) -> None:
    """Record (or update) this run's identity and status."""
    record = read_run(output_dir) or {}
    record.update({"format": "openkd.train/1", "openkd": __version__, "identity": new})
    record.setdefault("started_at", datetime.now(UTC).isoformat(timespec="seconds"))
    record.update(fields)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(output_dir / RUN_FILE, json.dumps(record, indent=2, default=str) + "\n")
