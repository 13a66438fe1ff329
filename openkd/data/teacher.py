"""Which teacher labelled a dataset, read from the metadata `openkd generate` wrote beside it
(`<stem>.meta.json`) or uploaded with it to the Hub. Shared by `openkd train` and `openkd eval`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Required, TypedDict

from openkd.data.layout import META_IN_REPO, OutputFiles
from openkd.paths import looks_like_path


class DatasetTeacher(TypedDict, total=False):
    """The teacher that labelled a dataset, as its metadata names it."""

    name: Required[str]  # several teachers' names joined by ", " for a mixed dataset
    revision: str
    backend: str
    temperature: float  # its sampling temperature


def meta_files(spec: str) -> list[Path]:
    """`<stem>.meta.json` files `openkd generate` wrote beside a local dataset."""
    path = Path(spec).expanduser()
    if path.is_file():
        candidate = OutputFiles.of_file(path).meta
        return [candidate] if candidate.is_file() else []
    if path.is_dir():
        return sorted(p for p in path.glob("*.meta.json") if p.is_file())
    return []


def hub_meta_file(spec: str) -> list[Path]:
    """The metadata `openkd generate --push-to-hub` uploads with a Hub dataset, if reachable."""
    if looks_like_path(spec):
        return []
    try:
        from huggingface_hub import hf_hub_download

        return [Path(hf_hub_download(spec, META_IN_REPO, repo_type="dataset"))]
    except Exception:  # not an openkd dataset, offline, private...: the teacher stays unknown
        return []


def read_teacher(spec: str) -> DatasetTeacher | None:
    """Teacher name and revision from the dataset's metadata, or None when there is none."""
    names: dict[str, DatasetTeacher] = {}
    for meta_path in meta_files(spec) or hub_meta_file(spec):
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        teacher = meta.get("teacher") if isinstance(meta, dict) else None
        if isinstance(teacher, str):
            teacher = {"name": teacher}
        if isinstance(teacher, dict) and teacher.get("name"):
            info = DatasetTeacher(name=teacher["name"])
            if teacher.get("revision"):
                info["revision"] = teacher["revision"]
            if teacher.get("backend"):
                info["backend"] = teacher["backend"]
            sampling = meta.get("sampling")
            if isinstance(sampling, dict) and "temperature" in sampling:
                info["temperature"] = sampling["temperature"]
            names[str(info["name"])] = info
    if not names:
        return None
    if len(names) == 1:
        return next(iter(names.values()))
    return DatasetTeacher(name=", ".join(sorted(names)))
