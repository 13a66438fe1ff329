"""Record ids: the fast path gives exactly the ids on disk; the compact id set answers like a set."""

from __future__ import annotations

import os
import random

import numpy as np

from openkd.data.schema import record_id
from openkd.generate.ids import IdSet, RecordIds, to_keys

SAMPLING = {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": 64, "stop": ["\n\n"], "seed": 3}


def test_fast_ids_equal_record_id_for_every_kind_of_prompt() -> None:
    prompts = [
        [{"role": "user", "content": "plain"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": 'q "quoted"\n'}],
        [{"role": "user", "content": "unicode: café ∑ 漢字 😀 \u2028 \x00"}],
        [{"role": "user", "content": ""}],
        [{"content": "keys in the other order", "role": "user"}],
        [{"role": "user", "content": "extra key", "name": "bob"}],  # not {role, content}
    ]
    for teacher in ("Qwen/Qwen2.5-7B-Instruct", "/models/tëacher@rev"):
        fast = RecordIds(teacher, SAMPLING)
        for messages in prompts:
            assert fast.of(messages) == record_id(messages, teacher, SAMPLING), messages
            for sample in (1, 7):
                ours, theirs = (
                    fast.of(messages, sample),
                    record_id(messages, teacher, SAMPLING, sample),
                )
                assert ours == theirs != fast.of(messages)


def test_id_set_membership_matches_a_python_set() -> None:
    rng = random.Random(0)
    ids = [os.urandom(16).hex() for _ in range(5000)]
    ours, reference = IdSet(to_keys(ids[:1000])), set(ids[:1000])
    for start in range(1000, 5000, 317):  # uneven chunks, as the source adds them
        chunk = ids[start : start + 317]
        ours.add(to_keys(chunk))
        reference.update(chunk)
        probe = rng.sample(ids, 200) + [os.urandom(16).hex() for _ in range(50)]
        found = ours.contains(to_keys(probe))
        assert found.tolist() == [p in reference for p in probe]
    assert len(ours) == len(reference) == 5000
    assert [k.ljust(12, b"\0") for k in ours.keys().tolist()] == sorted(
        bytes.fromhex(i)[:12] for i in ids
    )
    assert len(ours._runs) <= 12  # merged like a binary counter, not one run per chunk


def test_empty_set_and_keys_with_zero_bytes() -> None:
    empty = IdSet()
    assert empty.contains(to_keys(["00" * 16])).tolist() == [False]
    zeros = ["00" * 15 + "01", "00" * 16, "01" + "00" * 15]  # trailing NULs must still count
    s = IdSet(to_keys(zeros[:2]))
    assert s.contains(to_keys(zeros)).tolist() == [True, True, False]
    assert s.keys().dtype == np.dtype("S12")


def test_large_runs_spill_to_an_unlinked_memory_map_and_still_answer(tmp_path, monkeypatch):
    import openkd.generate.ids as ids_module

    monkeypatch.setattr(ids_module, "MAX_RUN", 512)
    ids = [os.urandom(16).hex() for _ in range(3000)]
    ours = IdSet(spill_dir=tmp_path)
    for start in range(0, 3000, 100):
        ours.add(to_keys(ids[start : start + 100]))
    spilled = [run for run in ours._runs if isinstance(run, np.memmap)]
    assert spilled and sum(map(len, spilled)) >= 2000  # the bulk left the process's heap
    assert list(tmp_path.iterdir()) == []  # unlinked at once: a kill leaves nothing behind
    probe = ids[::7] + [os.urandom(16).hex() for _ in range(50)]
    assert ours.contains(to_keys(probe)).tolist() == [True] * len(ids[::7]) + [False] * 50
    assert len(ours) == 3000
    # Nowhere to write (a missing or full directory): the set keeps its runs in memory.
    fallback = IdSet(to_keys(ids), spill_dir=tmp_path / "missing")
    assert not isinstance(fallback._runs[0], np.memmap) and len(fallback) == 3000
