"""`<output_dir>/openkd_run.json`: which run an output directory belongs to.

Written when a run starts: the student, a fingerprint of the rows trained on, and the settings
that change what a checkpoint means (learning rate, batch, template...). A rerun with the same
identity resumes from the directory's checkpoints; a different one is refused unless
`--overwrite`, so a checkpoint of one run is never resumed into another. Settings that do not
change the trajectory so far (steps, epochs, logging, saving, hub) may change between reruns.

The record is also openkd's mark on the directory: `--overwrite` removes only the files a run
writes (checkpoints, the saved student, logs), and only where the record is; a directory
without it is someone else's, and nothing in it is removed or written over.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from openkd import __version__, console
from openkd.data.jsonl import read_json_object, write_text_atomic
from openkd.errors import OpenkdError
from openkd.paths import check_writable, refuse_input_as_output
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
    "training_curves.png",
    RUN_FILE,
)
# Written by `openkd run` for the launched workers; openkd's, though it precedes RUN_FILE.
LAUNCH_CONFIG = "openkd_train.launch.yaml"
OWNED_DIRS = ("merged", "runs")
_OWNED_RE = re.compile(r"^(checkpoint-\d+(\.torn(-\d+)?)?|model-\d+-of-\d+\.safetensors)$")


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


def train_writes(relative: Path) -> bool:
    """True for a path inside --output-dir that training writes or `--overwrite` removes."""
    top = relative.parts[0] if relative.parts else ""
    return (
        top in ARTIFACTS or top in OWNED_DIRS or top == LAUNCH_CONFIG or bool(_OWNED_RE.match(top))
    )


def _entries(output_dir: Path) -> list[str]:
    if not output_dir.is_dir():
        return []
    skip = (LAUNCH_CONFIG, ".openkd-write-test-")
    return sorted(p.name for p in output_dir.iterdir() if not p.name.startswith(skip))


def _shown(names: list[str]) -> str:
    return ", ".join(names[:4]) + (f", and {len(names) - 4} more" if len(names) > 4 else "")


def check_unmarked(output_dir: Path, *, overwrite: bool) -> None:
    """An output dir without openkd's run record is not openkd's: refuse to delete anything in
    it (`--overwrite`), or to write over a file already there."""
    if (output_dir / RUN_FILE).is_file():
        return
    entries = _entries(output_dir)
    if overwrite and entries:
        raise OpenkdError(
            f"--output-dir {output_dir} holds files openkd did not write ({_shown(entries)}) "
            f"and no {RUN_FILE}; --overwrite removes only an earlier openkd run's files, so "
            "choose another --output-dir"
        )
    clashes = [name for name in entries if train_writes(Path(name))]
    if clashes:
        raise OpenkdError(
            f"--output-dir {output_dir} already holds {_shown(clashes)} but no {RUN_FILE}, so "
            "openkd did not write them and training would write over them; choose another "
            "--output-dir"
        )


def check_output_dir_usable(output_dir: Path) -> None:
    """Cheap check before anything heavy: --output-dir can be created and written."""
    if output_dir.exists() and not output_dir.is_dir():
        raise OpenkdError(f"--output-dir {output_dir} is a file; pass a directory")
    check_writable(output_dir, "--output-dir")


def check_inputs_outside(cfg: TrainConfig) -> None:
    """No input of the run is --output-dir, holds it, or lies where training writes in it."""
    refuse_input_as_output(
        cfg.output_dir,
        {
            "--student": cfg.student,
            "--dataset": cfg.dataset,
            "--eval-dataset": cfg.eval_dataset,
            "--chat-template": cfg.chat_template,
            "--logprobs": cfg.logprobs,
        },
        output_flag="--output-dir",
        written=train_writes,
    )


def check_output_dir(output_dir: Path, new: dict[str, Any], *, overwrite: bool) -> bool:
    """Refuse an output dir holding another run; True when it holds this run already.

    With `overwrite` the directory is checked by `clear_output_dir`, which only the main
    process runs: another rank checking here could see it half-cleared.
    """
    if overwrite:
        return False
    if not (output_dir / RUN_FILE).is_file():
        check_unmarked(output_dir, overwrite=False)
        return False
    old = read_run(output_dir) or {}
    diffs = differences(old.get("identity") or {}, new)
    if diffs:
        fix = "pass --overwrite to replace it, or choose another --output-dir"
        shown = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
        raise OpenkdError(f"--output-dir {output_dir} holds a different run ({shown}); {fix}")
    return True


def clear_output_dir(output_dir: Path) -> list[str]:
    """`--overwrite`: remove what an earlier openkd run wrote (checkpoints, final student, merged
    model, logs), named on the console first; other files stay. A directory without the run
    record is refused: nothing in it is known to be openkd's."""
    check_unmarked(output_dir, overwrite=True)
    if not output_dir.is_dir():
        return []
    names = [name for name in _entries(output_dir) if train_writes(Path(name))]
    # The run record goes last: a crash while clearing leaves a directory still known as openkd's.
    names.sort(key=lambda name: name == RUN_FILE)
    if names:
        console.warn(
            f"--overwrite: removing {len(names)} item(s) an earlier openkd run wrote in "
            f"{output_dir}: {_shown(names)}"
        )
    for name in names:
        path = output_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    return names


def write_run(output_dir: Path, new: dict[str, Any], **fields: Any) -> None:
    """Record (or update) this run's identity and status."""
    record = read_run(output_dir) or {}
    record.update({"format": "openkd.train/1", "openkd": __version__, "identity": new})
    record.setdefault("started_at", datetime.now(UTC).isoformat(timespec="seconds"))
    record.update(fields)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(output_dir / RUN_FILE, json.dumps(record, indent=2, default=str) + "\n")
