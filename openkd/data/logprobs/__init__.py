"""The teacher's top-k log-probabilities beside a generate output: the `<stem>.logprobs/` sidecar.

For `--output data/teacher.jsonl` the sidecar is the directory `data/teacher.logprobs/` (one per
output: its train, eval and truncated rows share it; a shard `teacher.shard-0-of-4.jsonl` has
`teacher.shard-0-of-4.logprobs/`). It holds Arrow IPC *stream* files, one per run that wrote
rows, `part-00000.arrow`, `part-00001.arrow`, ..., each a schema message followed by record
batches, one batch per `commit()` (a commit larger than 2^30 values is split in several).
Columns, one row per JSONL row:

    id            string         the JSONL row's id
    token_ids     list<int32>    the completion's token ids as the teacher produced them (T),
                                 its stop token included when it stopped on one
    top_ids       list<int32>    per completion position the teacher's top-K token ids, T*K
                                 values, row-major: they reshape to [T, K]
    top_logprobs  list<float16>  their raw (temperature 1) log-probabilities, same layout
                  (or float32)

K, the log-probability dtype and the format version are in the schema metadata (`k`, `dtype`,
`openkd.format`); any further metadata the writer was given is kept beside them. A position's
K entries are written in descending order of log-probability; readers do not rely on it.

Crash safety is the JSONL writer's: `commit()` writes one batch, flushes and fsyncs, and the
generate writer commits the sidecar *before* it fsyncs the JSONL rows, so a row is never
durable before its log-probabilities. A kill can leave a torn last message in a part;
`repair()` cuts it (as `repair_torn_tail` does for JSONL) and readers stop before it anyway.
Rows in the sidecar but not in the JSONL (committed just before a kill) are orphans: readers
look rows up by the JSONL's ids and never see them. A rerun may write an id again; duplicates
are harmless (greedy decoding gives the same data) and a lookup returns either.

Size: `bytes_per_token(k, dtype)` = 4 (token id) + K * (4 + 2) with float16: 124 bytes at
top-20, so 1M answers of 4k tokens are ~0.5 TB. Hence streaming writes (nothing accumulates
past a commit) and memory-mapped reads: `SidecarReader` keeps an index of 16 bytes per row and
maps the parts; a row's arrays are read from the page cache when asked for.
"""

from openkd.data.logprobs.format import (
    DTYPES,
    FORMAT,
    bytes_per_token,
    read_part_settings,
    scan_part,
    schema,
    sidecar_dir,
    top_k_arrays,
)
from openkd.data.logprobs.merge import MergeReport, merge, merge_beside
from openkd.data.logprobs.reader import SidecarReader, TeacherRow
from openkd.data.logprobs.writer import SidecarWriter, repair

__all__ = [
    "DTYPES",
    "FORMAT",
    "MergeReport",
    "SidecarReader",
    "SidecarWriter",
    "TeacherRow",
    "bytes_per_token",
    "merge",
    "merge_beside",
    "read_part_settings",
    "repair",
    "scan_part",
    "schema",
    "sidecar_dir",
    "top_k_arrays",
]
