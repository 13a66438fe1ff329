"""The one reader every export format streams from: a generate output's rows with their top-k.

Rows are read from the JSONL a line at a time and their arrays from the memory-mapped sidecar,
so memory stays flat in the dataset's size. Each row's arrays follow the sidecar's alignment:
position t of `top_ids`/`top_logprobs` is the teacher's distribution for completion token t,
`token_ids[t]` (given the prompt and tokens 0..t-1).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from openkd.data.jsonl import iter_jsonl, read_json_object
from openkd.data.layout import OutputFiles
from openkd.data.logprobs import SidecarReader, sidecar_dir
from openkd.errors import OpenkdError


@dataclass(frozen=True)
class Row:
    """One labelled row: the JSONL's messages and the sidecar's arrays (K = the export's K)."""

    id: str
    prompt: list[dict[str, Any]]
    completion: list[dict[str, Any]]
    finish_reason: str | None
    token_ids: np.ndarray  # [T] int32
    top_ids: np.ndarray  # [T, K] int32
    top_logprobs: np.ndarray  # [T, K] float32


@dataclass
class Provenance:
    """What each format records about where its labels came from."""

    teacher: str | None
    revision: str | None
    tokenizer: str | None
    k: int  # top-k written (the sidecar's K, or fewer with --top-k)
    sidecar_k: int
    dtype: str
    source: str
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "teacher": self.teacher,
            "revision": self.revision,
            "tokenizer": self.tokenizer,
            "k": self.k,
            "sidecar_k": self.sidecar_k,
            "logprob_dtype": self.dtype,
            "logprob_temperature": 1.0,
            "source": self.source,
            **self.extra,
        }


class Source:
    """A generate output (one of its JSONL files) and its sidecar, streamed row by row."""

    def __init__(self, jsonl: Path, top_k: int | None = None) -> None:
        self.path = Path(jsonl).expanduser()
        if not self.path.is_file():
            raise OpenkdError(
                f"--input {jsonl} does not exist; pass a JSONL file `openkd generate` wrote"
            )
        directory = sidecar_dir(self.path)
        if not directory.is_dir():
            raise OpenkdError(
                f"--input {jsonl} has no teacher log-probabilities ({directory}/ is missing); "
                "label it with `openkd generate --logprobs K`"
            )
        self.reader = SidecarReader(directory)
        if self.reader.k is None:
            raise OpenkdError(
                f"{directory} holds no log-probabilities yet; label with "
                "`openkd generate --logprobs K`"
            )
        self.sidecar_k = int(self.reader.k)
        if top_k is not None and top_k > self.sidecar_k:
            raise OpenkdError(
                f"--top-k {top_k} is more than the sidecar holds (top-{self.sidecar_k}); pass "
                f"--top-k {self.sidecar_k} or less, or label with `openkd generate --logprobs "
                f"{top_k}`"
            )
        self.k = top_k or self.sidecar_k
        meta = read_json_object(
            OutputFiles.of_file(self.path).meta, "regenerate it with `openkd generate`"
        )
        teacher = (meta or {}).get("teacher") or {}
        if isinstance(teacher, str):
            teacher = {"name": teacher}
        self.teacher: str | None = teacher.get("name") or self.reader.meta.get("teacher")
        self.revision: str | None = teacher.get("revision")

    def provenance(self, tokenizer: str | None) -> Provenance:
        return Provenance(
            teacher=self.teacher,
            revision=self.revision,
            tokenizer=tokenizer,
            k=self.k,
            sidecar_k=self.sidecar_k,
            dtype=self.reader.dtype or "float16",
            source=str(self.path),
        )

    def count(self) -> int:
        """Rows in the JSONL (a byte scan: no JSON parsing)."""
        lines = 0
        with open(self.path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                lines += chunk.count(b"\n")
        return lines

    def rows(self) -> Iterator[Row]:
        """Every row with its arrays; a row the sidecar lacks is an error naming it."""
        for lineno, raw in iter_jsonl(self.path):
            row_id = raw.get("id")
            if not isinstance(row_id, str):
                raise OpenkdError(
                    f"{self.path}:{lineno} has no 'id'; export reads what `openkd generate` wrote"
                )
            found = self.reader.get(row_id)
            if found is None:
                raise OpenkdError(
                    f"{self.path}:{lineno}: row {row_id} has no teacher log-probabilities in "
                    f"{self.reader.directories[0]}; relabel it with `openkd generate --logprobs "
                    f"{self.sidecar_k}` (a rerun labels what is missing)"
                )
            top_ids, top_logprobs = found.top_ids, found.top_logprobs
            if self.k < self.sidecar_k:  # keep each position's k most likely
                order = np.argsort(-top_logprobs, axis=1, kind="stable")[:, : self.k]
                top_ids = np.take_along_axis(top_ids, order, axis=1)
                top_logprobs = np.take_along_axis(top_logprobs, order, axis=1)
            yield Row(
                id=row_id,
                prompt=list(raw.get("prompt") or []),
                completion=list(raw.get("completion") or []),
                finish_reason=raw.get("finish_reason"),
                token_ids=np.asarray(found.token_ids, dtype=np.int32),
                top_ids=np.asarray(top_ids, dtype=np.int32),
                top_logprobs=np.asarray(top_logprobs, dtype=np.float32),
            )
