"""`--format parquet`: one row per answer, the top-k as list columns, for any reader.

    id            string
    prompt        list<struct<role, content>>   the messages the teacher answered
    completion    list<struct<role, content>>   its answer
    finish_reason string
    token_ids     list<int32>                   the answer's token ids as the teacher produced
                                                them (T), its stop token included
    top_ids       list<list<int32>>             [T][K]: at position t the teacher's top-K for
                                                token t (given the prompt and tokens < t)
    top_logprobs  list<list<float32>>           [T][K], their raw (temperature 1) log-probabilities

Files `data-00000.parquet`, ... (zstd); the provenance (teacher, tokenizer, K) is the JSON under
the key `openkd.export` of every file's key-value metadata.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from openkd.export import arrow
from openkd.export.source import Row
from openkd.export.writer import FormatWriter


class ParquetWriter(FormatWriter):
    name = "parquet"

    def schema(self) -> Any:
        import pyarrow as pa

        return pa.schema(
            [
                ("id", pa.string()),
                ("prompt", arrow.messages_type()),
                ("completion", arrow.messages_type()),
                ("finish_reason", pa.string()),
                ("token_ids", pa.list_(pa.int32())),
                ("top_ids", pa.list_(pa.list_(pa.int32()))),
                ("top_logprobs", pa.list_(pa.list_(pa.float32()))),
            ]
        )

    def prepare(self, row: Row) -> Row:
        return row

    def table(self, batch: list[Row]) -> tuple[Any, None]:
        import pyarrow as pa

        columns = [
            pa.array([r.id for r in batch], type=pa.string()),
            arrow.messages([r.prompt for r in batch]),
            arrow.messages([r.completion for r in batch]),
            pa.array([r.finish_reason for r in batch], type=pa.string()),
            arrow.flat_list([r.token_ids for r in batch], pa.int32()),
            arrow.nested_list([r.top_ids for r in batch], pa.int32()),
            arrow.nested_list([r.top_logprobs for r in batch], pa.float32()),
        ]
        return pa.Table.from_arrays(columns, schema=self.shards.schema), None

    def card(self, manifest: dict[str, Any]) -> str:
        return (
            "# Teacher top-k log-probabilities (openkd export, plain Parquet)\n\n"
            f"{manifest['rows']:,} answers, top-{self.provenance.k} per answer token, from "
            f"teacher `{self.provenance.teacher}`.\n\n"
            "Columns: `id`, `prompt`, `completion`, `finish_reason`, `token_ids` [T], `top_ids` "
            "[T][K], `top_logprobs` [T][K] (raw, temperature-1 log-probabilities). Position t "
            "holds the teacher's distribution for `token_ids[t]`, given the prompt and the "
            "tokens before it.\n\n"
            "```python\nimport pyarrow.parquet as pq\n"
            "table = pq.read_table('data-00000.parquet')\n```\n"
        )


def read_rows(files: list[Path], k: int | None) -> Iterator[tuple[str, Any, Any, Any]]:
    """(id, token_ids, top_ids [T, K], top_logprobs [T, K]) of every row of the files."""
    import pyarrow.parquet as pq

    for path in files:
        for batch in pq.ParquetFile(path).iter_batches(
            batch_size=256, columns=["id", "token_ids", "top_ids", "top_logprobs"]
        ):
            ids = batch.column(0).to_pylist()
            tokens = arrow.flat_rows(batch.column(1), np.int32)
            top_ids = arrow.nested_rows(batch.column(2), np.int32, k)
            logprobs = arrow.nested_rows(batch.column(3), np.float32, k)
            yield from zip(ids, tokens, top_ids, logprobs, strict=True)
