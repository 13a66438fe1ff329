"""Crash-safe JSONL primitives: torn tails are cut, bad lines are named, replacements are atomic."""

from __future__ import annotations

import json

import pytest

from openkd.data.jsonl import (
    AtomicWriter,
    iter_jsonl,
    repair_torn_tail,
    write_jsonl_atomic,
)
from openkd.errors import OpenkdError


def test_repair_cuts_only_the_partial_last_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"id": "a"}\n{"id": "b"}\n{"id": "c", "pro')
    assert repair_torn_tail(path) == len(b'{"id": "c", "pro')
    assert path.read_bytes() == b'{"id": "a"}\n{"id": "b"}\n'
    assert repair_torn_tail(path) == 0  # idempotent on a clean file


def test_repair_of_a_file_with_no_complete_line_empties_it(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"id": "a", "tor' * 10_000)  # longer than one read block, no newline
    repair_torn_tail(path)
    assert path.read_bytes() == b""


@pytest.mark.parametrize(
    "content,expected",
    [
        (b'{"a": 1}\n{"a": \n', r"rows\.jsonl:2: not valid JSON"),
        (b'{"a": 1}\n\n{"a": "\xff"}\n', r"rows\.jsonl:3: not valid UTF-8"),
        (b'{"a": 1}\n[1, 2]\n', r"rows\.jsonl:2: expected a JSON object"),
    ],
)
def test_bad_lines_are_named_by_file_and_line(tmp_path, content, expected):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(content)
    with pytest.raises(OpenkdError, match=expected):
        list(iter_jsonl(path))


def test_atomic_writer_leaves_the_old_file_on_error(tmp_path):
    path = tmp_path / "rows.jsonl"
    write_jsonl_atomic(path, [{"id": "old"}])
    with pytest.raises(RuntimeError), AtomicWriter(path) as fh:
        fh.write(json.dumps({"id": "new"}) + "\n")
        raise RuntimeError("killed halfway")
    assert path.read_text() == '{"id":"old"}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl"]  # no temp file left


def test_atomic_files_get_the_usual_permissions(tmp_path):
    import stat

    from openkd.data import jsonl

    write_text_atomic = jsonl.write_text_atomic
    write_text_atomic(tmp_path / "meta.json", "{}")
    mode = stat.S_IMODE((tmp_path / "meta.json").stat().st_mode)
    assert mode == 0o666 & ~jsonl.UMASK  # as open() would make it, not mkstemp's 0600
