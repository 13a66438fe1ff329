"""The `<stem>.logprobs/` sidecar: write, commit, kill, repair, read (memory-mapped), merge."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from openkd.data.logprobs import (
    SidecarReader,
    SidecarWriter,
    bytes_per_token,
    merge,
    repair,
    scan_part,
    sidecar_dir,
    top_k_arrays,
)
from openkd.errors import OpenkdError

K = 4


def make_row(seed: int, length: int | None = None, k: int = K):
    rng = np.random.default_rng(seed)
    t = int(rng.integers(0, 12)) if length is None else length
    return (
        rng.integers(0, 50_000, t),
        rng.integers(0, 50_000, (t, k)),
        np.sort(-rng.random((t, k)) * 10, axis=1)[:, ::-1],
    )


def assert_row(got, want, atol=1e-2):
    tokens, ids, logprobs = want
    assert got is not None
    assert np.array_equal(got.token_ids, tokens)
    assert np.array_equal(got.top_ids, ids)
    assert got.top_logprobs.dtype == np.float32 and got.top_logprobs.shape == ids.shape
    assert np.allclose(got.top_logprobs, logprobs, atol=atol)


def write(directory: Path, rows: dict[str, tuple], per_commit: int = 3, **kw) -> SidecarWriter:
    with SidecarWriter(directory, K, **kw) as writer:
        for i, (row_id, row) in enumerate(rows.items()):
            writer.add(row_id, *row)
            if i % per_commit == per_commit - 1:
                writer.commit()
    return writer


def test_naming_beside_the_output_and_its_side_files():
    from openkd.data.layout import OutputFiles, resolve_output

    assert sidecar_dir("data/teacher.jsonl") == Path("data/teacher.logprobs")
    assert sidecar_dir("data/teacher.eval.jsonl") == Path("data/teacher.logprobs")
    assert sidecar_dir("data/teacher.truncated.jsonl") == Path("data/teacher.logprobs")
    shard = resolve_output(Path("d/t.jsonl"), (1, 4))
    assert shard.logprobs == Path("d/t.shard-1-of-4.logprobs")
    assert OutputFiles(Path("d/t.jsonl")).logprobs == Path("d/t.logprobs")
    assert bytes_per_token(20) == 4 + 20 * 4 + 20 * 2 == 124
    assert bytes_per_token(20, "float32") == 164


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_write_commit_read_roundtrip(tmp_path, dtype):
    rows = {f"id-{i}": make_row(i) for i in range(10)}
    rows["empty"] = make_row(99, length=0)
    directory = tmp_path / "t.logprobs"
    writer = SidecarWriter(directory, K, dtype, meta={"teacher": "org/big"})
    assert not directory.exists()  # nothing is created before a commit with rows
    assert writer.commit() == 0
    for i, (row_id, row) in enumerate(rows.items()):
        writer.add(row_id, *row)
        if i == 4:
            written = writer.commit()
            assert written > 0 and writer.pending == 0
            assert writer.path.stat().st_size == written  # flushed: all of it is on disk
    writer.close()
    assert writer.bytes_written == writer.path.stat().st_size
    assert writer.rows_written == len(rows)

    reader = SidecarReader(directory)
    assert (reader.k, reader.dtype, reader.meta["teacher"]) == (K, dtype, "org/big")
    assert len(reader) == reader.rows == len(rows)
    for row_id, row in rows.items():
        assert_row(reader.get(row_id), row, atol=1e-2 if dtype == "float16" else 1e-6)
        assert np.array_equal(reader.token_ids(row_id), row[0])
    assert reader.get("nope") is None and "nope" not in reader and "id-3" in reader
    with pytest.raises(KeyError):
        reader["nope"]
    assert [row_id for row_id, _ in reader] == list(rows)
    assert reader.missing(["id-1", "x", "id-2", "y"]) == ["x", "y"]


def test_a_second_run_writes_a_new_part_and_k_must_match(tmp_path):
    directory = tmp_path / "s.logprobs"
    write(directory, {"a": make_row(1)})
    second = write(directory, {"b": make_row(2)})
    assert second.path.name == "part-00001.arrow"
    assert set(dict(SidecarReader(directory))) == {"a", "b"}
    with pytest.raises(OpenkdError, match="holds top-4 float16 log-probabilities, this run writes"):
        SidecarWriter(directory, 8)
    with pytest.raises(ValueError, match=r"top_ids and top_logprobs \[T, 4\]"):
        SidecarWriter(directory, K).add("c", [1, 2], np.zeros((2, 3)), np.zeros((2, 3)))


def test_duplicates_and_orphans_are_harmless(tmp_path):
    directory = tmp_path / "d.logprobs"
    first = make_row(5)
    write(directory, {"a": first, "orphan": make_row(6)})
    write(directory, {"a": first, "b": make_row(7)})  # a rerun wrote "a" again
    reader = SidecarReader(directory)
    assert reader.rows == 4 and len(reader) == 3
    assert [row_id for row_id, _ in reader] == ["a", "orphan", "b"]
    assert_row(reader.get("a"), first)
    # readers are driven by the JSONL's ids: the orphan is simply never asked for
    assert reader.missing(["a", "b"]) == []


def test_torn_last_message_is_skipped_by_readers_and_cut_by_repair(tmp_path):
    directory = tmp_path / "k.logprobs"
    rows = {f"r{i}": make_row(i, length=6) for i in range(6)}
    writer = write(directory, rows, per_commit=3)  # two batches of three rows
    part = writer.path
    whole = part.read_bytes()
    ends = _message_ends(part)
    assert len(ends) == 4  # schema, two batches, end-of-stream marker
    # Cut anywhere inside the second batch: the first three rows survive, exactly.
    for cut in (ends[1] + 1, ends[1] + 9, (ends[1] + ends[2]) // 2, ends[2] - 1):
        part.write_bytes(whole[:cut])
        reader = SidecarReader(directory)
        assert reader.torn == [part]
        assert set(dict(reader)) == {"r0", "r1", "r2"}
        assert scan_part(part) == (ends[1], True)
        assert repair(directory) == cut - ends[1]
        assert part.stat().st_size == ends[1] and scan_part(part) == (ends[1], False)
        assert repair(directory) == 0
        # the next run appends a new part; everything reads back
        write(directory, {f"r{i}": rows[f"r{i}"] for i in (3, 4, 5)})
        reader = SidecarReader(directory)
        assert reader.torn == [] and len(reader) == 6
        for row_id, row in rows.items():
            assert_row(reader.get(row_id), row)
        for extra in directory.glob("part-0000[1-9].arrow"):
            extra.unlink()
    # Killed inside the schema message of a new part: the part is removed.
    part.write_bytes(whole[:7])
    assert repair(directory) == 7 and not part.exists()


def _message_ends(path: Path) -> list[int]:
    ends = []
    with pa.memory_map(str(path)) as source:
        while True:
            try:
                pa.ipc.read_message(source)
            except EOFError:
                ends.append(source.tell())
                return ends
            ends.append(source.tell())


def test_sigkill_mid_stream_then_repair_and_read(tmp_path):
    """A writer killed while committing in a loop: every row that was read back is whole."""
    directory = tmp_path / "kill.logprobs"
    script = textwrap.dedent(
        f"""
        import numpy as np, sys
        from openkd.data.logprobs import SidecarWriter
        w = SidecarWriter({str(directory)!r}, 20)
        rng = np.random.default_rng(0)
        i = 0
        while True:
            for _ in range(8):
                t = 300
                w.add(f"row-{{i}}", np.full(t, i % 1000), np.full((t, 20), i % 1000),
                      np.full((t, 20), -(i % 7), dtype=np.float32))
                i += 1
            w.commit()
            if i == 64:
                print("ready", flush=True)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=os.environ.copy()
    )
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    repair(directory)
    reader = SidecarReader(directory)
    assert reader.torn == [] and reader.rows >= 64 and reader.rows % 8 == 0
    for row_id, row in reader:
        i = int(row_id.split("-")[1])
        assert row.top_ids.shape == (300, 20) and (row.top_ids == i % 1000).all()
        assert (row.top_logprobs == -(i % 7)).all()


def test_reads_are_memory_mapped_not_loaded(tmp_path):
    directory = tmp_path / "big.logprobs"
    with SidecarWriter(directory, 20) as writer:
        for i in range(400):
            writer.add(f"r{i}", np.full(500, i), np.full((500, 20), i), np.zeros((500, 20)))
            if i % 50 == 49:
                writer.commit()
    size = sum(p.stat().st_size for p in directory.iterdir())
    assert size >= 400 * 500 * bytes_per_token(20)  # ~25 MB
    before = pa.total_allocated_bytes()
    reader = SidecarReader(directory)
    row = reader.get("r399")
    assert (row.top_ids == 399).all()
    assert pa.total_allocated_bytes() - before < 1_000_000  # the index, not the data
    assert not row.top_ids.flags.writeable  # a view of the map


def test_merge_joins_shards_checks_ids_and_keeps_inputs(tmp_path):
    a, b = tmp_path / "t.shard-0-of-2.logprobs", tmp_path / "t.shard-1-of-2.logprobs"
    rows_a = {f"a{i}": make_row(i) for i in range(5)}
    rows_b = {f"b{i}": make_row(10 + i) for i in range(4)}
    write(a, rows_a)
    write(a, {"a9": make_row(9)})
    write(b, rows_b)
    # shard b was killed mid-commit once: its torn tail is not merged, its file not changed
    torn = write(b, {"b9": make_row(19, length=8)}).path
    torn_bytes = torn.read_bytes()[:-20]
    torn.write_bytes(torn_bytes)
    out = tmp_path / "t.logprobs"
    report = merge([a, b], out)
    assert report.parts == 4
    assert sorted(p.name for p in out.iterdir()) == [f"part-0000{i}.arrow" for i in range(4)]
    merged = SidecarReader(out)
    assert set(dict(merged)) == set(rows_a) | {"a9"} | set(rows_b)
    for row_id, row in {**rows_a, **rows_b}.items():
        assert_row(merged.get(row_id), row)
    assert torn.read_bytes() == torn_bytes
    # merging again replaces the output
    assert merge([a, b], out).parts == 4

    write(tmp_path / "c.logprobs", {"b2": make_row(12)})
    with pytest.raises(OpenkdError, match=r"duplicate id b2 in .*t.shard-1-of-2.logprobs and"):
        merge([a, b, tmp_path / "c.logprobs"], tmp_path / "bad")
    with SidecarWriter(tmp_path / "k8.logprobs", 8) as other:
        other.add("z", *make_row(1, length=2, k=8))
    with pytest.raises(OpenkdError, match="different top-k settings"):
        merge([a, tmp_path / "k8.logprobs"], tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_merge_beside_shards(tmp_path):
    from openkd.data.logprobs import merge_beside

    shards = [tmp_path / f"t.shard-{i}-of-2.jsonl" for i in range(2)]
    assert merge_beside(shards, tmp_path / "t.jsonl") is None  # no sidecars: nothing to do
    write(sidecar_dir(shards[0]), {"a": make_row(1)})
    with pytest.raises(OpenkdError, match=r"t.shard-1-of-2.jsonl has no t.shard-1-of-2.logprobs/"):
        merge_beside(shards, tmp_path / "t.jsonl")
    write(sidecar_dir(shards[1]), {"b": make_row(2)})
    assert merge_beside(shards, tmp_path / "t.jsonl").rows == 2
    assert set(dict(SidecarReader(tmp_path / "t.logprobs"))) == {"a", "b"}


def test_top_k_arrays_from_engine_maps():
    positions = [{5: -0.1, 7: -3.0, 9: -2.0}, {1: -1.0, 2: -0.5, 3: -9.0, 4: -0.7}]
    ids, logprobs = top_k_arrays(positions, 3)
    assert ids.tolist() == [[5, 9, 7], [2, 4, 1]]
    assert logprobs.dtype == np.float16 and np.allclose(logprobs[1], [-0.5, -0.7, -1.0], atol=1e-3)
    with pytest.raises(ValueError, match="fewer than 3"):
        top_k_arrays([{1: 0.0}], 3)
