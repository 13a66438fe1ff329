"""`--format axolotl-kd`: axolotl's KD dataset (`type: axolotl.integrations.kd.chat_template`).

axolotl's KD plugin ("V2" loader, `ChatTemplateStrategyWithKDv2` in
`src/axolotl/integrations/kd/chat_template.py`) reads, per row:

    messages          list<struct<role, content>>  tokenised by axolotl with the chat template
    target_token_ids  list<list<int32>>            [L][K] top-k token ids
    target_logprobs   list<list<float32>>          [L][K] their log-probabilities
                                                   (`logprobs_field: target_logprobs`)

Alignment. The loader right-aligns the L rows with the N tokens axolotl's template gives the
conversation: row r lands at position N - L + r (the first N - L positions are padding). Its
trainer (`kd/trainer.py` and `kd/kernels/liger.py`) pairs position j's row with the student's
output at position j, which predicts token j + 1 (only the hard labels are shifted; the online
teacher collator builds rows the same way, dropping position 0). So the row at position j must
be the teacher's distribution for token j + 1. openkd writes one row per position from the last
prompt token (P - 1, predicting the answer's first token) to the last token (N - 1):

    row r < T        the teacher's top-k for answer token r (sidecar position r)
    row r >= T       the template's tokens after the teacher's ids (say "\n" after the end of
                     turn), and past the last token the end-of-turn token: a one-hot stand-in
                     (log-probability 0, the rest -30), since the teacher gave none there

The loader masks position j with `labels[j]` (the token at j, not the one predicted), so axolotl
trains the rows of positions P..N-1 with labels: the stand-ins at the end are hard labels of
the template's own tokens, and row 0 (the answer's first token) is masked out by axolotl.

Each row's conversation is re-tokenised here as axolotl will; a row whose answer does not
re-tokenise to the teacher's ids is left out (counted, the first named): its rows would land on
other tokens. The loader renormalises each position's top-k (exp, sum to 1, log), so a
log-probability whose exp underflows float32 would come back -inf and make the loss NaN:
values below -80 are written as -80 (probability < 2e-35). `temperature: 1.0` in the dataset
config says the values are raw (temperature 1) log-probabilities, which they are.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from openkd.export import arrow
from openkd.export.source import Row
from openkd.export.tokens import Tokens
from openkd.export.writer import FormatWriter

LOGPROB_FIELD = "target_logprobs"
IDS_FIELD = "target_token_ids"
MESSAGES_FIELDS = ("messages", "conversation", "conversations")
# Log-probabilities are written at least this: exp() of it stays a normal float32.
FLOOR = -80.0
# The stand-in rows: log-probability 0 on the token, this on the K - 1 others.
STAND_IN = -30.0

MISMATCH = "the answer does not re-tokenise to the teacher's token ids"
PROMPT_MISMATCH = "the chat template renders the prompt differently inside the conversation"


def stand_in(token: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """A one-hot-like row: `token` first, then the K - 1 smallest other ids."""
    others = [i for i in range(k) if i != token][: k - 1]
    ids = np.array([token, *others], dtype=np.int32)
    logprobs = np.full(k, STAND_IN, dtype=np.float32)
    logprobs[0] = 0.0
    return ids, logprobs


def layout(tokens: Tokens, row: Row) -> tuple[list[dict[str, Any]], np.ndarray, np.ndarray] | str:
    """(messages, target ids [L, K], target log-probabilities [L, K]), or why the row is out."""
    messages = [*row.prompt, *row.completion]
    prompt = tokens.prompt_ids(row.prompt)
    full = tokens.conversation_ids(messages)
    p, t, n = len(prompt), len(row.token_ids), len(full)
    if full[:p] != prompt:
        return PROMPT_MISMATCH
    if full[p : p + t] != row.token_ids.tolist():
        return MISMATCH
    k = row.top_ids.shape[1]
    ids = np.zeros((n - p + 1, k), dtype=np.int32)
    logprobs = np.zeros((n - p + 1, k), dtype=np.float32)
    ids[:t] = row.top_ids
    logprobs[:t] = np.maximum(row.top_logprobs, FLOOR)
    end = tokens.eos_id if tokens.eos_id is not None else full[-1]
    for r in range(t, n - p + 1):
        ids[r], logprobs[r] = stand_in(full[p + r] if p + r < n else end, k)
    return messages, ids, logprobs


class AxolotlWriter(FormatWriter):
    name = "axolotl-kd"
    needs_tokenizer = True

    def schema(self) -> Any:
        import pyarrow as pa

        return pa.schema(
            [
                ("id", pa.string()),
                ("messages", arrow.messages_type()),
                (IDS_FIELD, pa.list_(pa.list_(pa.int32()))),
                (LOGPROB_FIELD, pa.list_(pa.list_(pa.float32()))),
            ]
        )

    def metadata(self) -> dict[str, Any]:
        return {**super().metadata(), "alignment": "row j predicts token j+1; rows right-aligned"}

    def prepare(self, row: Row) -> Any:
        assert self.tokens is not None
        laid = layout(self.tokens, row)
        if isinstance(laid, str):
            self.counts.skip(laid, row.id)
            return None
        return (row.id, *laid)

    def table(self, batch: list[Any]) -> tuple[Any, None]:
        import pyarrow as pa

        columns = [
            pa.array([b[0] for b in batch], type=pa.string()),
            arrow.messages([b[1] for b in batch]),
            arrow.nested_list([b[2] for b in batch], pa.int32()),
            arrow.nested_list([b[3] for b in batch], pa.float32()),
        ]
        return pa.Table.from_arrays(columns, schema=self.shards.schema), None

    def card(self, manifest: dict[str, Any]) -> str:
        return (
            "# Teacher top-k log-probabilities for axolotl's KD plugin (openkd export)\n\n"
            f"{manifest['rows']:,} conversations, top-{self.provenance.k} per position, from "
            f"teacher `{self.provenance.teacher}` (tokenised with `{self.provenance.tokenizer}`)."
            "\n\nIn the axolotl config:\n\n```yaml\n" + config_snippet(self.directory) + "```\n\n"
            "Row j of `target_token_ids`/`target_logprobs` (right-aligned with the tokenised "
            "conversation) is the teacher's distribution for token j + 1; see openkd's "
            "`openkd/export/axolotl.py` for the alignment.\n"
        )


def config_snippet(path: Path | str) -> str:
    return (
        "plugins:\n  - axolotl.integrations.kd.KDPlugin\nkd_trainer: true\n"
        "kd_ce_alpha: 0.1\nkd_alpha: 0.9\nkd_temperature: 1.0\n"
        "datasets:\n"
        f"  - path: {path}\n    ds_type: parquet\n"
        "    type: axolotl.integrations.kd.chat_template\n"
        "    field_messages: messages\n"
        f"    logprobs_field: {LOGPROB_FIELD}\n"
        "    temperature: 1.0  # the teacher's raw log-probabilities\n"
    )


def messages_field(names: list[str]) -> str | None:
    return next((n for n in MESSAGES_FIELDS if n in names), None)


def logprobs_field(names: list[str]) -> str | None:
    return next((n for n in (LOGPROB_FIELD, "logprobs") if n in names), None)


def read_rows(
    files: list[Path], tokens: Tokens, k: int | None
) -> Iterator[tuple[str, Any, Any, Any] | tuple[str, str]]:
    """(id, token_ids, top_ids, top_logprobs) per row, or (id, why) for a row left out.

    The inverse of `layout`, for any axolotl KD set: the conversation is tokenised with
    `tokens`, the rows are right-aligned with it, and the answer is the last message's tokens
    up to its end of turn; row j (position j) is the teacher's distribution for token j + 1.
    Rows without an `id` column are keyed by their row number ("0", "1", ...).
    """
    import pyarrow.parquet as pq

    number = 0
    for path in files:
        parquet = pq.ParquetFile(path)
        names = parquet.schema_arrow.names
        field, values = messages_field(names), logprobs_field(names)
        columns = [c for c in ("id", field, IDS_FIELD, values) if c and c in names]
        for batch in parquet.iter_batches(batch_size=128, columns=columns):
            data = dict(zip(columns, batch.columns, strict=True))
            ids = data["id"].to_pylist() if "id" in data else None
            conversations = data[field].to_pylist()  # type: ignore[index]
            tops = arrow.nested_rows(data[IDS_FIELD], np.int64, k)
            logprobs = arrow.nested_rows(data[values], np.float32, k)  # type: ignore[index]
            for i, messages in enumerate(conversations):
                row_id = ids[i] if ids is not None else str(number)
                number += 1
                yield (row_id, *unlayout(tokens, messages, tops[i], logprobs[i]))


def unlayout(
    tokens: Tokens, messages: list[dict[str, Any]], top_ids: np.ndarray, top_logprobs: np.ndarray
) -> tuple[Any, Any, Any] | tuple[str]:
    if not messages or messages[-1].get("role") != "assistant":
        return ("its last message is not the assistant's answer",)
    prompt = tokens.prompt_ids(messages[:-1])
    full = tokens.conversation_ids(messages)
    p, n, rows = len(prompt), len(full), len(top_ids)
    start = n - rows  # the position of row 0
    if full[:p] != prompt:
        return (PROMPT_MISMATCH,)
    if p - 1 < start:
        return (f"its {rows} rows do not reach back to the answer's first token",)
    eos = tokens.eos_id
    answer = full[p:]
    if eos is not None and eos in answer:
        answer = answer[: answer.index(eos) + 1]
    first = p - 1 - start
    sl = slice(first, first + len(answer))
    return np.asarray(answer, dtype=np.int32), top_ids[sl], top_logprobs[sl]
