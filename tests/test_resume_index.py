"""The resume index: a rerun reads ids instead of rows, and never trusts an index that lies.

Rows appended after the index (a kill between the row fsync and the index write) are read
from the file's tail; a file replaced, edited or cut below the index is re-read in full.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from openkd.data.layout import OutputFiles
from openkd.generate.ids import KEY_BYTES
from openkd.generate.resume import Index, load_state
from openkd.generate.writer import OutputWriter


def key(i: int) -> str:
    return f"{i:024x}" + "0" * 8


def row(i: int, tokens: int = 3) -> dict:
    return {
        "id": key(i),
        "prompt": [{"role": "user", "content": f"p{i}"}],
        "completion": [{"role": "assistant", "content": f"a{i}"}],
        "finish_reason": "stop",
        "prompt_tokens": 2,
        "completion_tokens": tokens,
        "source_index": i,
    }


def write_rows(files: OutputFiles, rows: dict[str, list[dict]]) -> None:
    writer = OutputWriter(files, load_state(files).index, commit_interval=1.0)
    for kind, records in rows.items():
        for record in records:
            writer.add(kind, record)
    writer.commit()
    writer.close()


def done_ids(files: OutputFiles) -> set[str]:
    """The ids a rerun skips, as 32 hex digits (the set keeps 12 bytes; these ids end in 0s)."""
    keys = load_state(files).done.keys().tolist()
    return {key.ljust(12, b"\0").hex() + "0" * 8 for key in keys}


@pytest.fixture
def files(tmp_path: Path) -> OutputFiles:
    return OutputFiles(tmp_path / "t.jsonl")


def test_commit_writes_rows_ids_and_an_index_that_matches(files: OutputFiles) -> None:
    write_rows(files, {"train": [row(i) for i in range(5)], "eval": [row(9, tokens=7)]})
    index = Index.read(files.index)
    assert index is not None and index.ids == 6
    assert files.ids.stat().st_size == 6 * KEY_BYTES
    assert index.counts.train.rows == 5 and index.counts.eval.completion_tokens == 7
    assert index.marks["train"].size == files.output.stat().st_size
    state = load_state(files)
    assert not state.rebuilt and len(state.done) == 6
    assert done_ids(files) == {key(i) for i in (0, 1, 2, 3, 4, 9)}


def test_rows_after_the_index_are_read_from_the_tail(files: OutputFiles) -> None:
    write_rows(files, {"train": [row(i) for i in range(3)]})
    with open(files.output, "a") as fh:  # committed rows whose index write never happened
        fh.write(json.dumps(row(7)) + "\n" + json.dumps(row(8)) + "\n")
    state = load_state(files)
    assert not state.rebuilt
    assert done_ids(files) == {key(i) for i in (0, 1, 2, 7, 8)}
    assert state.counts.train.rows == 5
    assert Index.read(files.index).ids == 5  # the tail is now indexed


def test_an_edited_or_replaced_file_makes_the_index_stale(files: OutputFiles) -> None:
    write_rows(files, {"train": [row(i) for i in range(4)]})
    lines = files.output.read_text().splitlines(keepends=True)
    # Replace the file (new inode) with two of its rows, as `grep > x && mv x` would.
    replacement = files.output.with_name("new.jsonl")
    replacement.write_text(lines[0] + lines[2])
    os.replace(replacement, files.output)
    state = load_state(files)
    assert state.rebuilt and state.counts.train.rows == 2
    assert done_ids(files) == {key(i) for i in (0, 2)}

    # Same inode, same size, different bytes before the mark: edited in place.
    text = files.output.read_text().replace('"a0"', '"b0"')
    with open(files.output, "r+") as fh:
        fh.write(text)
    assert load_state(files).rebuilt


def test_ids_file_longer_or_shorter_than_the_index(files: OutputFiles) -> None:
    write_rows(files, {"train": [row(i) for i in range(3)]})
    with open(files.ids, "ab") as fh:  # a commit killed after the ids, before the index
        fh.write(b"\x01" * KEY_BYTES * 2)
    state = load_state(files)
    assert not state.rebuilt and len(state.done) == 3
    assert done_ids(files) == {key(i) for i in range(3)}
    with open(files.ids, "r+b") as fh:
        fh.truncate(KEY_BYTES)  # lost ids: the index cannot be trusted
    state = load_state(files)
    assert state.rebuilt and len(state.done) == 3
    assert files.ids.stat().st_size == 3 * KEY_BYTES


def test_missing_index_is_rebuilt_from_the_files(files: OutputFiles) -> None:
    write_rows(files, {"train": [row(i) for i in range(3)], "truncated": [row(5)]})
    files.index.unlink()
    files.ids.unlink()
    state = load_state(files)
    assert state.rebuilt and len(state.done) == 4
    assert state.counts.truncated.rows == 1
    assert Index.read(files.index).ids == 4


def test_a_foreign_row_is_named(files: OutputFiles) -> None:
    files.output.write_text('{"id": "not-hex", "text": "mine"}\n')
    from openkd.errors import OpenkdError

    with pytest.raises(OpenkdError, match=r"t\.jsonl:1: row has no openkd 'id'"):
        load_state(files)
