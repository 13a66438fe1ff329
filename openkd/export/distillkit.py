"""`--format distillkit`: DistillKit's compressed Parquet (`teacher: kind: dataset`).

DistillKit's capture (`distillkit/sample_logits_vllm.py`) writes `data_0.parquet`, ... with

    input_ids            list<uint64>        the whole sequence (N tokens)
    compressed_logprobs  list<list<uint8>>   [N - 1][bytes] per position, see `openkd.export.codec`
    bytepacked_indices   list<list<uint8>>   [N - 1][bytes] the top-k token ids, bit-packed

and `compression_config.yaml` (its `DistributionQuantizationConfig`: d, k, exact_k, ...), which
the training config must repeat under `teacher: logprob_compressor:`. Row j holds the teacher's
distribution at position j, i.e. for token j + 1 (vLLM's prompt log-probabilities without the
first, empty one); DistillKit's loss compares row j with the student's logits at j, and its
packer cuts `input_ids` (and `labels`) to the rows' length.

openkd writes `input_ids` = the prompt as the teacher's chat template renders it (with the
generation prompt) + the teacher's answer ids, so the answer's token t (position P + t) is
predicted by row P - 1 + t: its sidecar position t. DistillKit masks both its losses with
`labels[j] >= 0` at position j, so openkd adds a `labels` column that is the token where row j
holds the teacher's data (j = P - 1 .. P + T - 2) and -100 elsewhere: the KL then covers exactly
the answer's tokens (cross-entropy sees the same positions through Hugging Face's shift, i.e.
the last prompt token through the answer's second to last). The prompt's rows carry a stand-in
(the next token at log-probability 0), masked out. Log-probabilities below -10000 (and -inf)
are written as -10000, what openkd's loss takes for probability 0.

Row ids, which DistillKit has no column for (its packer would split a string column), are in
each file's key-value metadata (`openkd.ids`), beside the provenance (`openkd.export`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from openkd.errors import OpenkdError
from openkd.export import arrow
from openkd.export.codec import CompressionConfig, compress, decompress
from openkd.export.sink import IDS_KEY
from openkd.export.source import Row
from openkd.export.writer import FormatWriter

CONFIG_FILE = "compression_config.yaml"
IGNORE = -100
FLOOR = -1e4
STAND_IN = -30.0


def read_config(path: Path) -> CompressionConfig:
    """A `compression_config.yaml` (DistillKit's keys); one-line errors."""
    from pydantic import ValidationError

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        return CompressionConfig.model_validate(data)
    except (OSError, yaml.YAMLError) as exc:
        raise OpenkdError(f"{path} is unreadable ({exc}); pass DistillKit's YAML") from exc
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in exc.errors()
        )
        raise OpenkdError(
            f"{path} is not a DistillKit compression config ({problems}); fix it"
        ) from exc


class DistillKitWriter(FormatWriter):
    name = "distillkit"
    needs_tokenizer = True
    file_name = "data_{}.parquet"

    @property
    def config(self) -> CompressionConfig:
        return self.options.distillkit_config

    def schema(self) -> Any:
        import pyarrow as pa

        return pa.schema(
            [
                ("input_ids", pa.list_(pa.uint64())),
                ("compressed_logprobs", pa.list_(pa.list_(pa.uint8()))),
                ("bytepacked_indices", pa.list_(pa.list_(pa.uint8()))),
                ("labels", pa.list_(pa.int64())),
            ]
        )

    def metadata(self) -> dict[str, Any]:
        return {
            **super().metadata(),
            "alignment": "row j predicts token j+1; labels >= 0 where a row holds teacher data",
            "compression": self.config.model_dump(mode="json"),
        }

    def prepare(self, row: Row) -> Any:
        assert self.tokens is not None
        prompt = self.tokens.prompt_ids(row.prompt)
        p, t = len(prompt), len(row.token_ids)
        if not p:
            self.counts.skip("the chat template renders the prompt as no tokens", row.id)
            return None
        input_ids = np.asarray([*prompt, *row.token_ids.tolist()], dtype=np.int64)
        n = len(input_ids)
        ids = np.zeros((max(n - 1, 0), row.top_ids.shape[1]), dtype=np.int64)
        logprobs = np.full(ids.shape, STAND_IN, dtype=np.float32)
        ids[:, 0] = input_ids[1:]  # the prompt's stand-ins: the next token, probability 1
        ids[:, 1:] = np.arange(1, ids.shape[1])[None, :]
        logprobs[:, 0] = 0.0
        if t:
            ids[p - 1 : p - 1 + t] = row.top_ids
            logprobs[p - 1 : p - 1 + t] = np.nan_to_num(row.top_logprobs, nan=FLOOR, neginf=FLOOR)
        logprobs = np.maximum(logprobs, FLOOR)
        labels = np.full(n, IGNORE, dtype=np.int64)
        labels[p - 1 : p - 1 + t] = input_ids[p - 1 : p - 1 + t]
        return row.id, input_ids, ids, logprobs, labels

    def table(self, batch: list[Any]) -> tuple[Any, list[str]]:
        import pyarrow as pa

        cfg = self.config
        ids = np.concatenate([b[2] for b in batch])
        logprobs = np.concatenate([b[3] for b in batch])
        largest = int(ids.max()) if ids.size else -1
        if largest >= cfg.d:
            raise OpenkdError(
                f"token id {largest} does not fit the DistillKit vocabulary d={cfg.d} (ids take "
                f"{cfg.index_bits} bits); pass a --distillkit-config with d above {largest}, or "
                "the teacher's --tokenizer"
            )
        packed, indices = compress(cfg, ids, logprobs)
        lengths = [len(b[2]) for b in batch]
        ends = np.cumsum(lengths)[:-1]
        columns = [
            arrow.flat_list([b[1].astype(np.uint64) for b in batch], pa.uint64()),
            arrow.nested_list(np.split(packed, ends), pa.uint8()),
            arrow.nested_list(np.split(indices, ends), pa.uint8()),
            arrow.flat_list([b[4] for b in batch], pa.int64()),
        ]
        table = pa.Table.from_arrays(columns, schema=self.shards.schema)
        return table, [b[0] for b in batch]

    def side_files(self) -> None:
        text = yaml.safe_dump(self.config.model_dump(mode="json"), sort_keys=False)
        (self.directory / CONFIG_FILE).write_text(text, encoding="utf-8")

    def card(self, manifest: dict[str, Any]) -> str:
        cfg = yaml.safe_dump(self.config.model_dump(mode="json"), sort_keys=False)
        cfg = "\n".join("    " + line for line in cfg.splitlines())
        return (
            "# Teacher top-k log-probabilities for DistillKit (openkd export)\n\n"
            f"{manifest['rows']:,} sequences, top-{self.config.k} per position, from teacher "
            f"`{self.provenance.teacher}` (prompts rendered with `{self.provenance.tokenizer}`),"
            f" {self.config.bytes_per_position} bytes per position.\n\n"
            "Pack it (`distillkit-pack-logits`, after `datasets.load_dataset('parquet', "
            "data_dir=...).save_to_disk(...)`) and train with\n\n```yaml\n"
            "dataset:\n  prepacked: true\nteacher:\n  kind: dataset\n  logprob_compressor:\n"
            f"{cfg}\n```\n\n"
            "`labels` is >= 0 exactly where a row holds the teacher's distribution (row j: token "
            "j + 1), so DistillKit's KL covers the answer and nothing else.\n"
        )


def read_rows(
    files: list[Path], cfg: CompressionConfig
) -> Iterator[tuple[str, Any, Any, Any] | tuple[str, str]]:
    """(id, token_ids, top_ids [T, k], top_logprobs [T, k]) per row, or (id, why).

    The answer is the tokens whose rows have `labels >= 0` (row j predicts token j + 1), from
    the first such row to the last; without a `labels` column, every token but the first. Ids
    come from the files' `openkd.ids` metadata, else the row number ("0", "1", ...).
    """
    import json

    import pyarrow.parquet as pq

    number = 0
    for path in files:
        parquet = pq.ParquetFile(path)
        names = parquet.schema_arrow.names
        if "compressed_logprobs" not in names or "bytepacked_indices" not in names:
            raise OpenkdError(
                f"{path} has no compressed_logprobs/bytepacked_indices columns (legacy or raw "
                "DistillKit sets are not read); re-capture with DistillKit's compressor"
            )
        stored = (parquet.metadata.metadata or {}).get(IDS_KEY.encode())
        file_ids = json.loads(stored) if stored else None
        columns = [c for c in ("input_ids", "compressed_logprobs", "bytepacked_indices", "labels")
                   if c in names]  # fmt: skip
        at = 0
        for batch in parquet.iter_batches(batch_size=128, columns=columns):
            data = dict(zip(columns, batch.columns, strict=True))
            inputs = arrow.flat_rows(data["input_ids"], np.int64)
            packed = arrow.nested_rows(data["compressed_logprobs"], np.uint8, cfg.logprob_bytes)
            index = arrow.nested_rows(data["bytepacked_indices"], np.uint8, cfg.index_bytes)
            labels = arrow.flat_rows(data["labels"], np.int64) if "labels" in data else None
            lengths = [len(p) for p in packed]
            top_ids, values = decompress(cfg, np.concatenate(packed), np.concatenate(index))
            ends = np.cumsum(lengths)[:-1]
            for i, (ids_i, lp_i) in enumerate(
                zip(np.split(top_ids, ends), np.split(values, ends), strict=True)
            ):
                row_id = file_ids[at] if file_ids else str(number)
                at += 1
                number += 1
                rows = len(ids_i)
                if labels is not None:
                    marked = np.flatnonzero(labels[i][:rows] >= 0)
                    if not len(marked):
                        yield row_id, "no position has a label"
                        continue
                    first, last = int(marked[0]), int(marked[-1])
                else:
                    first, last = 0, rows - 1
                answer = inputs[i][first + 1 : last + 2].astype(np.int32)
                if len(answer) != last - first + 1:
                    yield row_id, "its rows reach past its input_ids"
                    continue
                yield row_id, answer, ids_i[first : last + 1], lp_i[first : last + 1]
