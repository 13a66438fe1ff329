"""`<stem>.meta.json`: what made a dataset, so it can be trusted, resumed, merged and reproduced.

It holds the teacher, sampling settings, versions, row and token counts per file, a history of
the runs that appended to the output, and the resolved config. `GenerateMeta` builds itself at
the start of a run, finishes itself at the end, and merges shards; the JSON on disk keeps one
layout (`FORMAT`). Secrets never go in: `api_key_env` is only a variable name, and values under
secret-looking keys (in `llm_kwargs`, `--serve-args`, URLs with credentials) are "<redacted>".
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, NotRequired, TypedDict, cast

from openkd.data.jsonl import read_json_object, write_text_atomic
from openkd.data.layout import ROW_KINDS
from openkd.data.schema import LabelledRow
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
# The settings that say where prompts came from and how they were turned into rows.
SOURCE_KEYS = (
    "dataset", "subset", "split", "prompt_column", "messages_column", "prompt_template",
    "system_prompt", "max_samples", "shuffle_seed", "shard", "eval_fraction", "keep_truncated",
)  # fmt: skip


# running: not finished (or killed); complete; incomplete: failed or invalid prompts remain;
# stopped: Ctrl-C, SIGTERM or a dead teacher; unknown: metadata that does not say.
RunStatus = Literal["running", "complete", "incomplete", "stopped", "unknown"]


class TeacherInfo(TypedDict, total=False):
    name: str
    revision: str | None
    backend: str
    llm_class: str  # distilabel only


class RunEntry(TypedDict):
    """One invocation's line in the metadata's history."""

    started_at: str
    finished_at: str
    status: RunStatus
    backend: str
    selected: int
    already_done: int
    duplicates: int
    invalid: int
    labelled: int
    failed: int
    prompt_tokens: int
    completion_tokens: int
    wall_seconds: float
    labelling_seconds: float
    rows_per_second: float | None
    completion_tokens_per_second: float | None
    shard_file: NotRequired[str]  # a merged output's: the shard it ran on


class Throughput(TypedDict):
    rows_per_second: float | None
    completion_tokens_per_second: float | None


class SoftLabels(TypedDict):
    """--logprobs K: what the sidecar holds."""

    k: int
    dtype: str
    bytes: NotRequired[int]  # on disk, once a run finished
    bytes_per_token: NotRequired[float | None]  # the last run's rows'


class HubPush(TypedDict):
    repo_id: str
    private: bool
    pushed_at: str


class MergedShard(TypedDict):
    file: str
    shard: str | None  # "i/n"
    status: NotRequired[str]  # the shard's RunStatus, "missing" or "no metadata"


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def teacher_key(teacher: str, revision: str | None) -> str:
    """The teacher as it enters record ids: a revision makes a different teacher."""
    return f"{teacher}@{revision}" if revision else teacher


# --- counts -----------------------------------------------------------------------------------


@dataclass
class Tally:
    """Rows and tokens of one file."""

    rows: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, row: LabelledRow) -> None:
        self.rows += 1
        self.prompt_tokens += int(row.get("prompt_tokens") or 0)
        self.completion_tokens += int(row.get("completion_tokens") or 0)

    def __iadd__(self, other: Tally) -> Tally:
        self.rows += other.rows
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        return self


@dataclass
class Counts:
    """What an output holds: a tally per row file, and how many prompts failed."""

    train: Tally = field(default_factory=Tally)
    eval: Tally = field(default_factory=Tally)
    truncated: Tally = field(default_factory=Tally)
    rejected: Tally = field(default_factory=Tally)  # answers that failed --verify
    failed: int = 0

    def of(self, kind: str) -> Tally:
        return getattr(self, kind)

    @property
    def kept(self) -> Tally:
        """The rows a student trains and is evaluated on (train + eval)."""
        total = Tally()
        total += self.train
        total += self.eval
        return total

    def to_json(self) -> dict[str, Any]:
        return {
            **{kind: asdict(self.of(kind)) for kind in ROW_KINDS},
            "failed": {"rows": self.failed},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> Counts:
        data = data or {}
        tallies = {
            kind: Tally(**{k: int(v) for k, v in (data.get(kind) or {}).items() if k in _TALLY})
            for kind in ROW_KINDS
        }
        return cls(**tallies, failed=int((data.get("failed") or {}).get("rows", 0)))


_TALLY = {f.name for f in fields(Tally)}


# --- the metadata -----------------------------------------------------------------------------


@dataclass
class GenerateMeta:
    """The contents of `<stem>.meta.json`."""

    output: str
    teacher: TeacherInfo
    sampling: dict[str, Any]  # `Sampling.as_dict()`
    source: dict[str, Any]  # the SOURCE_KEYS settings
    files: dict[str, str]  # row kind (and "card") -> file name
    config: dict[str, Any]  # the resolved config, redacted
    counts: Counts = field(default_factory=Counts)
    status: RunStatus = "running"
    started_at: str = field(default_factory=now)
    finished_at: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    runs: list[RunEntry] = field(default_factory=list)
    throughput: Throughput | None = None
    hub: HubPush | None = None
    merged_from: list[MergedShard] | None = None
    merged_at: str | None = None
    logprobs: SoftLabels | None = None
    # --verify: method, keep, answers, prompts and a "pass@k" rate per k (keys vary with k)
    verification: dict[str, Any] | None = None

    @property
    def label_settings(self) -> dict[str, Any]:
        """What must match for new rows to join this output."""
        soft = {key: self.logprobs[key] for key in ("k", "dtype")} if self.logprobs else None
        return label_settings(
            self.teacher.get("name"), self.teacher.get("revision"), self.sampling, soft
        )

    @classmethod
    def start(
        cls,
        *,
        config: dict[str, Any],
        files: dict[str, str],
        sampling: dict[str, Any],
        counts: Counts,
        previous: GenerateMeta | None,
        versions: dict[str, str],
        llm_class: str | None = None,
    ) -> GenerateMeta:
        """The metadata of a run about to start; `config` is the resolved config (redacted
        here), `previous` the output's metadata so far (its history is kept)."""
        config = redact(config)
        teacher: TeacherInfo = {
            "name": config["teacher"],
            "revision": config["revision"],
            "backend": config["backend"],
        }
        if llm_class:
            teacher["llm_class"] = llm_class
        soft = config.get("logprobs")
        return cls(
            output=files["train"],
            teacher=teacher,
            sampling=sampling,
            source={key: config[key] for key in SOURCE_KEYS},
            files=files,
            config=config,
            counts=counts,
            started_at=(previous.started_at if previous else None) or now(),
            versions=versions,
            runs=list(previous.runs)[-MAX_RUNS + 1 :] if previous else [],
            logprobs={"k": soft, "dtype": config["logprobs_dtype"]} if soft else None,
        )

    def finish(
        self, status: RunStatus, counts: Counts, run: RunEntry, versions: dict[str, str]
    ) -> None:
        """Record how this run ended: its entry in the history, totals, throughput."""
        self.status = status
        self.finished_at = now()
        self.counts = counts
        self.versions = {**self.versions, **versions}
        self.runs.append(run)
        self.throughput = {
            "rows_per_second": run.get("rows_per_second"),
            "completion_tokens_per_second": run.get("completion_tokens_per_second"),
        }

    @classmethod
    def merge(
        cls,
        shards: list[tuple[str, GenerateMeta | None]],
        *,
        output: str,
        files: dict[str, str],
        counts: Counts,
    ) -> GenerateMeta:
        """One output's metadata from its shards' (`(shard file name, its metadata)` pairs)."""
        known = [meta for _, meta in shards if meta is not None]
        if not known:
            return cls(output, {}, {}, {}, files, {}, counts, status="incomplete")
        first = known[0]
        runs: list[RunEntry] = [
            {**run, "shard_file": name}
            for name, meta in shards
            for run in (meta.runs if meta else [])
        ]
        complete = all(m.status == "complete" for m in known) and not counts.failed
        config = dict(first.config)
        if config:
            config.update(shard=None, output=output)
        return cls(
            output=output,
            teacher=first.teacher,
            sampling=first.sampling,
            source={**first.source, "shard": None},
            files=files,
            config=config,
            counts=counts,
            status="complete" if complete else "incomplete",
            started_at=min(m.started_at for m in known),
            finished_at=max((m.finished_at for m in known if m.finished_at), default=now()),
            versions=first.versions,
            runs=runs[-MAX_RUNS:],
            logprobs=first.logprobs,
            merged_from=[
                {"file": name, "shard": meta.source.get("shard") if meta else None}
                for name, meta in shards
            ],
            merged_at=now(),
        )

    # -- on disk -----------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "format": FORMAT,
            "output": self.output,
            "status": self.status,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "teacher": self.teacher,
            "sampling": self.sampling,
            "fingerprint": self.label_settings,  # the key's name predates the property's
            "source": self.source,
            "files": self.files,
            "versions": self.versions,
            "counts": self.counts.to_json(),
            "tokens": asdict(self.counts.kept),
            "runs": self.runs,
            "config": self.config,
        }
        for key in ("logprobs", "verification", "throughput", "hub", "merged_from", "merged_at"):
            if getattr(self, key) is not None:
                data[key] = getattr(self, key)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GenerateMeta:
        return cls(
            output=str(data.get("output", "")),
            teacher=cast(TeacherInfo, dict(data.get("teacher") or {})),
            sampling=dict(data.get("sampling") or {}),
            source=dict(data.get("source") or {}),
            files=dict(data.get("files") or {}),
            config=dict(data.get("config") or {}),
            counts=Counts.from_json(data.get("counts")),
            status=cast(RunStatus, str(data.get("status", "unknown"))),
            started_at=str(data.get("started_at") or now()),
            finished_at=data.get("finished_at"),
            versions=dict(data.get("versions") or {}),
            runs=list(data.get("runs") or []),
            throughput=data.get("throughput"),
            hub=data.get("hub"),
            merged_from=data.get("merged_from"),
            merged_at=data.get("merged_at"),
            logprobs=data.get("logprobs"),
            verification=data.get("verification"),
        )

    def write(self, path: Path) -> None:
        write_text_atomic(path, json.dumps(self.to_json(), indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def read(cls, path: Path) -> GenerateMeta | None:
        """The metadata at `path`; None when there is none, OpenkdError when it is unreadable."""
        data = read_json_object(path, "delete it and rerun with --overwrite to start fresh")
        return cls.from_json(data) if data is not None else None


def label_settings(
    teacher: Any, revision: Any, sampling: dict[str, Any], logprobs: dict[str, Any] | None = None
) -> dict[str, Any]:
    """What must match for new rows to join an existing output (soft labels: K and dtype)."""
    found = {"teacher": teacher, "revision": revision, "sampling": sampling}
    return {**found, "logprobs": logprobs} if logprobs else found


def check_compatible(
    meta: GenerateMeta | None, expected: dict[str, Any], output: Path, has_rows: bool
) -> None:
    """Refuse to append rows made differently (teacher, revision, sampling) to `output`."""
    if not has_rows:
        return
    fix = "pass --overwrite to start fresh, or another --output"
    if meta is None:
        raise OpenkdError(
            f"{output} already has rows but no {output.with_suffix('').name}.meta.json, so "
            "openkd cannot tell how they were made (openkd did not write it, and --overwrite "
            "never deletes what openkd did not write); pass another --output"
        )
    found = meta.label_settings
    diffs = []
    for key in ("teacher", "revision"):
        if found.get(key) != expected[key]:
            diffs.append(f"{key} {found.get(key)!r} (this run: {expected[key]!r})")
    if found.get("logprobs") != expected.get("logprobs"):
        diffs.append(f"logprobs {found.get('logprobs')!r} (this run: {expected.get('logprobs')!r})")
    old_sampling, new_sampling = found.get("sampling") or {}, expected["sampling"]
    for key in sorted(set(old_sampling) | set(new_sampling)):
        if old_sampling.get(key) != new_sampling.get(key):
            diffs.append(f"{key} {old_sampling.get(key)!r} (this run: {new_sampling.get(key)!r})")
    if diffs:
        raise OpenkdError(f"{output} was generated with {', '.join(diffs)}; {fix}")


# --- secrets ----------------------------------------------------------------------------------


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
