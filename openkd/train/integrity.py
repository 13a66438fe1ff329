"""Is a checkpoint whole? Cheap checks of the files a Trainer (or DeepSpeed) writes: headers,
sizes and zip directories, never tensor data, so a 6 GB checkpoint is checked in well under a
second. `openkd.train.checkpoints` uses them to never resume from one a crash left half-written.
"""

from __future__ import annotations

import json
import math
import re
import struct
import zipfile
from pathlib import Path

from openkd.errors import brief

TRAINER_STATE = "trainer_state.json"
SAFE_WEIGHTS = "model.safetensors"
SAFE_WEIGHTS_INDEX = "model.safetensors.index.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BIN_WEIGHTS = ("pytorch_model.bin", "adapter_model.bin")
OPTIMIZER = "optimizer.pt"
SCHEDULER = "scheduler.pt"
DEEPSPEED_LATEST = "latest"

# Bytes per element of each safetensors dtype, to check a header against the file's length.
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
_CRC_CHECK_BYTES = 1024 * 1024  # zip members up to this size (pickles, small tensors) are read
_DS_OPTIM_RE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")
_DS_ZERO3_MODEL_RE = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_\d+_model_states\.pt$")
_DS_MODEL_RE = re.compile(r"^mp_rank_\d+_model_states\.pt$")


def checkpoint_problems(path: Path, expected_step: int | None = None) -> list[str]:
    """Everything wrong with one checkpoint directory, as short phrases; empty means usable.

    Checks what the Trainer will read on resume: trainer_state.json (parses; its global_step
    matches the directory name), the weights (full model, shards or LoRA adapter), the
    optimizer and scheduler (or DeepSpeed's `latest` tag and per-rank shards), RNG states.
    """
    try:
        return _problems(path, expected_step)
    except OSError as exc:  # e.g. removed while being read
        return [f"cannot be read ({exc.strerror or exc})"]


def _problems(path: Path, expected_step: int | None) -> list[str]:
    if not path.is_dir():
        return ["not a directory"]
    names = {p.name for p in path.iterdir()}
    if not names:
        return ["empty directory"]
    problems: list[str] = []
    problems += _state_problems(path, expected_step)
    ds_tag = path / DEEPSPEED_LATEST
    is_deepspeed = ds_tag.exists() or any(n.startswith("global_step") for n in names)
    problems += _weights_problems(path, names, required=not is_deepspeed)
    if is_deepspeed:
        problems += deepspeed_problems(path, expected_step)
    else:
        problems += _optimizer_problems(path, names)
    for name in sorted(names):
        if (name.startswith("rng_state") and name.endswith(".pth")) or name == "scaler.pt":
            problem = torch_file_problem(path / name)
            if problem:
                problems.append(f"{name} {problem}")
    return problems


def _state_problems(path: Path, expected_step: int | None) -> list[str]:
    state_file = path / TRAINER_STATE
    if not state_file.is_file():
        return [f"no {TRAINER_STATE}"]
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return [f"{TRAINER_STATE} is not valid JSON (truncated?)"]
    step = state.get("global_step") if isinstance(state, dict) else None
    if not isinstance(step, int):
        return [f"{TRAINER_STATE} has no global_step"]
    if expected_step is not None and step != expected_step:
        return [f"{TRAINER_STATE} says step {step}, not {expected_step}"]
    return []


def _weights_problems(path: Path, names: set[str], *, required: bool) -> list[str]:
    """Full weights, an index of shards, or a LoRA adapter; DeepSpeed may hold them itself."""
    if SAFE_WEIGHTS_INDEX in names:
        return _index_problems(path / SAFE_WEIGHTS_INDEX)
    for name in (SAFE_WEIGHTS, ADAPTER_WEIGHTS):
        if name in names:
            problem = safetensors_problem(path / name)
            return [f"{name} {problem}"] if problem else []
    for name in BIN_WEIGHTS:
        if name in names:
            problem = torch_file_problem(path / name)
            return [f"{name} {problem}"] if problem else []
    if required:
        return [f"no model weights ({SAFE_WEIGHTS} or {ADAPTER_WEIGHTS})"]
    return []


def _index_problems(index_file: Path) -> list[str]:
    try:
        weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
        return [f"{index_file.name} is not a valid shard index (truncated?)"]
    problems = []
    for shard in shards:
        shard_path = index_file.parent / shard
        problem = "is missing" if not shard_path.is_file() else safetensors_problem(shard_path)
        if problem:
            problems.append(f"{shard} {problem}")
    return problems


def _optimizer_problems(path: Path, names: set[str]) -> list[str]:
    # Without optimizer.pt the Trainer silently restarts Adam from zero: not a real resume.
    problems = []
    for name in (OPTIMIZER, SCHEDULER):
        if name not in names:
            problems.append(f"no {name}")
            continue
        problem = torch_file_problem(path / name, load=True)
        if problem:
            problems.append(f"{name} {problem}")
    return problems


def deepspeed_problems(path: Path, expected_step: int | None = None) -> list[str]:
    """DeepSpeed's layout: `latest` names a tag directory holding every rank's shard files.

    The number of ranks comes from rank 0's model-state file (`dp_world_size`), so a rank
    whose files are missing altogether is noticed too.
    """
    tag_dir, problem = _deepspeed_tag_dir(path)
    if tag_dir is None:
        return [problem]
    tag = tag_dir.name
    if expected_step is not None and tag != f"global_step{expected_step}":
        return [f"DeepSpeed '{DEEPSPEED_LATEST}' names {tag}, not global_step{expected_step}"]
    files = {p.name: p for p in tag_dir.iterdir() if p.is_file()}
    problems = []
    for name in sorted(files):
        if name.endswith(".pt") and (broken := torch_file_problem(files[name])):
            problems.append(f"{tag}/{name} {broken}")
    if problems:
        return problems
    meta, problem = _deepspeed_meta(tag_dir)
    if problem:
        return [problem]
    optim_ranks = _ranks(files, _DS_OPTIM_RE)
    zero3_ranks = _ranks(files, _DS_ZERO3_MODEL_RE)
    world = meta.get("dp_world_size")
    expected = set(range(world)) if isinstance(world, int) else optim_ranks | zero3_ranks
    if missing := sorted(expected - optim_ranks):
        problems.append(f"{tag}/ lacks the optimizer state shards of rank(s) {missing}")
    if zero3_ranks and (missing := sorted(expected - zero3_ranks)):
        problems.append(f"{tag}/ lacks the model state shards of rank(s) {missing}")
    return problems


def _deepspeed_tag_dir(path: Path) -> tuple[Path | None, str]:
    latest = path / DEEPSPEED_LATEST
    if not latest.is_file():
        return None, f"no DeepSpeed '{DEEPSPEED_LATEST}' tag file"
    tag = latest.read_text(encoding="utf-8", errors="replace").strip()
    if not tag:
        return None, f"DeepSpeed '{DEEPSPEED_LATEST}' tag file is empty"
    if not (path / tag).is_dir():
        return None, f"DeepSpeed '{DEEPSPEED_LATEST}' names {tag}/, which does not exist"
    return path / tag, ""


def _deepspeed_meta(tag_dir: Path) -> tuple[dict, str]:
    """Rank 0's model-state file without its tensors: dp_world_size, global_steps, ds_version."""
    for name in ("zero_pp_rank_0_mp_rank_00_model_states.pt", "mp_rank_00_model_states.pt"):
        if (tag_dir / name).is_file():
            break
    else:
        return {}, f"{tag_dir.name}/ has no model state file of rank 0"
    import pickle

    import torch

    try:
        meta = torch.load(tag_dir / name, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, OSError) as exc:
        return {}, f"{tag_dir.name}/{name} does not load ({brief(exc, 120)})"
    return (meta if isinstance(meta, dict) else {}), ""


def deepspeed_world_size(path: Path) -> int | None:
    """How many data-parallel ranks wrote a DeepSpeed checkpoint (None if not DeepSpeed)."""
    tag_dir, _ = _deepspeed_tag_dir(path)
    if tag_dir is None:
        return None
    meta, _ = _deepspeed_meta(tag_dir)
    world = meta.get("dp_world_size")
    if isinstance(world, int):
        return world
    return len(_ranks({p.name: p for p in tag_dir.iterdir()}, _DS_OPTIM_RE)) or None


def _ranks(files: dict[str, Path], pattern: re.Pattern[str]) -> set[int]:
    return {int(m.group(1)) for name in files if (m := pattern.search(name))}


def _read_state(path: Path) -> dict:
    try:
        state = json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def safetensors_problem(path: Path) -> str | None:
    """Why a .safetensors file is unreadable (truncated, bad header), or None if it is whole.

    Reads only the header: the format stores each tensor's byte range, so a complete file is
    exactly 8 + header + the end of the last range long.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return f"is truncated ({size} bytes)"
            (header_len,) = struct.unpack("<Q", head)
            if header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
                return f"is truncated ({size} bytes, header claims {header_len})"
            header = json.loads(fh.read(header_len))
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "has a corrupt header"
    if not isinstance(header, dict):
        return "has a corrupt header"
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = info["data_offsets"]
            numel = math.prod(info["shape"])
            width = _DTYPE_BYTES.get(info["dtype"])
        except (KeyError, TypeError, ValueError):
            return f"has a corrupt header entry for {name}"
        if width is not None and stop - begin != numel * width:
            return f"has a corrupt header entry for {name}"
        end = max(end, stop)
    expected = 8 + header_len + end
    if size != expected:
        return f"is {size} bytes but its header describes {expected} (truncated?)"
    return None


def torch_file_problem(path: Path, *, load: bool = False) -> str | None:
    """Why a `torch.save` file is unreadable, or None if it is whole.

    Checks the zip directory at the end of the file (a truncated file has none) and that every
    member lies inside the file; the small pickle members are CRC-checked. With `load`, also
    `torch.load(weights_only=True, mmap=True)` as the Trainer will: the pickle is read, tensor
    data is only mapped.
    """
    try:
        size = path.stat().st_size
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    if size == 0:
        return "is empty"
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if info.header_offset + info.compress_size > size:
                    return "is truncated"
                if info.file_size <= _CRC_CHECK_BYTES:
                    zf.read(info)  # raises on a CRC mismatch
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError):
        return "is truncated or corrupt (not a complete torch.save file)"
    if load:
        import pickle

        import torch

        try:
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, OSError) as exc:
            return f"does not load ({brief(exc, 120)})"
    return None
