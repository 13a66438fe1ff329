"""Reading `openkd generate` output for training: formats, schema errors, filtering, splits."""

from __future__ import annotations

import json
from unittest import mock

import pytest

from openkd.data.teacher import read_teacher
from openkd.errors import OpenkdError
from openkd.train.data import (
    check_schema,
    fingerprint,
    load_rows,
    load_train_data,
)
from tests.conftest import write_jsonl


def record(i: int, answer: str | None = None, finish: str = "stop") -> dict:
    return {
        "id": f"id{i}",
        "prompt": [{"role": "user", "content": f"question {i}"}],
        "completion": [
            {"role": "assistant", "content": f"answer {i}" if answer is None else answer}
        ],
        "finish_reason": finish,
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "source_index": i,
    }


def load(path, **kw):
    options = dict(
        eval_dataset=None, eval_fraction=0.0, keep_truncated=False, max_samples=None, seed=0
    )
    options.update(kw)
    return load_train_data(str(path), **options)


def test_truncated_and_empty_rows_are_skipped_and_counted(tmp_path):
    rows = [record(i) for i in range(6)]
    rows[1] = record(1, finish="length")
    rows[2] = record(2, answer="  ")
    rows[3] = record(3, answer="", finish="length")  # counted once, as truncated
    rows[4]["extra"] = "dropped before the trainer"
    path = write_jsonl(tmp_path / "teacher.jsonl", rows)
    data = load(path)
    assert (data.filtered.rows, data.filtered.truncated, data.filtered.empty) == (6, 2, 1)
    assert data.filtered.skipped == 3
    assert data.train.column_names == ["prompt", "completion"]
    assert [r["completion"][0]["content"] for r in data.train] == [
        "answer 0",
        "answer 4",
        "answer 5",
    ]

    kept = load(path, keep_truncated=True)
    assert len(kept.train) == 6 and kept.filtered.skipped == 0


def test_all_rows_filtered_names_counts_and_keep_truncated(tmp_path):
    path = write_jsonl(
        tmp_path / "t.jsonl",
        [record(0, finish="length"), record(1, finish="length"), record(2, "")],
    )
    with pytest.raises(OpenkdError) as err:
        load(path)
    msg = str(err.value)
    assert "all 3 rows were filtered out" in msg and "2 truncated" in msg and "1 empty" in msg
    assert "--keep-truncated" in msg


def test_max_samples_then_eval_fraction(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [record(i) for i in range(20)])
    data = load(path, max_samples=10, eval_fraction=0.2, seed=3)
    assert (len(data.train), len(data.eval)) == (8, 2)
    used = {r["prompt"][0]["content"] for r in data.train} | {
        r["prompt"][0]["content"] for r in data.eval
    }
    assert used == {f"question {i}" for i in range(10)}
    again = load(path, max_samples=10, eval_fraction=0.2, seed=3)
    assert again.fingerprint == data.fingerprint
    assert load(path, max_samples=10, eval_fraction=0.2, seed=4).fingerprint != data.fingerprint


def test_directory_of_shards_skips_generate_side_files(tmp_path):
    write_jsonl(tmp_path / "t.shard-0-of-2.jsonl", [record(0), record(1)])
    write_jsonl(tmp_path / "t.shard-1-of-2.jsonl", [record(2)])
    write_jsonl(tmp_path / "t.shard-0-of-2.eval.jsonl", [record(7)])
    write_jsonl(tmp_path / "t.shard-0-of-2.truncated.jsonl", [record(8, finish="length")])
    (tmp_path / "t.shard-0-of-2.failed.jsonl").write_text('{"reason": "timeout"}\n')
    rows = load_rows(str(tmp_path))
    assert sorted(rows["id"]) == ["id0", "id1", "id2"]


def test_save_to_disk_directory(tmp_path):
    from datasets import Dataset

    Dataset.from_list([record(0), record(1)]).save_to_disk(str(tmp_path / "ds"))
    data = load(tmp_path / "ds")
    assert len(data.train) == 2


def test_not_openkd_format_says_what_is_expected(tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "hello"}])
    with pytest.raises(OpenkdError) as err:
        check_schema(load_rows(str(prompts)), str(prompts))
    msg = str(err.value)
    assert "no 'completion' column" in msg and "openkd generate" in msg

    plain = write_jsonl(tmp_path / "plain.jsonl", [{"prompt": "q", "completion": "a"}])
    with pytest.raises(
        OpenkdError, match=r"column 'prompt' holds .* not a list of \{role, content\}"
    ):
        check_schema(load_rows(str(plain)), str(plain))


def test_missing_and_broken_files_are_named(tmp_path):
    with pytest.raises(OpenkdError, match=r"no such file or directory"):
        load_rows(str(tmp_path / "nope.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(record(0)) + "\n{not json\n")
    with pytest.raises(OpenkdError, match=r"bad\.jsonl:2: not valid JSON"):
        load_rows(str(bad))


def test_teacher_comes_from_the_meta_file(tmp_path):
    path = write_jsonl(tmp_path / "teacher.jsonl", [record(0)])
    assert read_teacher(str(path)) is None
    meta = {
        "teacher": {"name": "org/big", "revision": "abc", "backend": "vllm"},
        "sampling": {"temperature": 0.0},
    }
    (tmp_path / "teacher.meta.json").write_text(json.dumps(meta))
    assert read_teacher(str(path)) == {
        "name": "org/big",
        "revision": "abc",
        "backend": "vllm",
        "temperature": 0.0,
    }
    assert read_teacher(str(tmp_path))["name"] == "org/big"


def test_fingerprint_ignores_where_rows_live_but_not_what_they_are(tmp_path):
    a = load(write_jsonl(tmp_path / "a.jsonl", [record(0), record(1)]))
    b = load(write_jsonl(tmp_path / "b" / "copy.jsonl", [record(0), record(1)]))
    c = load(write_jsonl(tmp_path / "c.jsonl", [record(0), record(2)]))
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert fingerprint([a.train, None]) == fingerprint([b.train, None])


def test_unknown_hub_dataset_is_a_clear_error():
    with pytest.raises(
        OpenkdError,
        match=r"--dataset no-such-org/no-such-set: not a local path, and loading it as a Hub dataset failed",
    ):
        load_rows("no-such-org/no-such-set")


def test_teacher_of_a_hub_dataset_comes_from_its_uploaded_metadata(tmp_path):
    meta = tmp_path / "openkd_meta.json"
    meta.write_text(json.dumps({"teacher": {"name": "org/big"}}))
    with mock.patch("huggingface_hub.hf_hub_download", return_value=str(meta)) as download:
        assert read_teacher("org/distill-set") == {"name": "org/big"}
    download.assert_called_once_with("org/distill-set", "openkd_meta.json", repo_type="dataset")
    with mock.patch("huggingface_hub.hf_hub_download", side_effect=OSError("offline")):
        assert read_teacher("org/distill-set") is None


def test_eval_dataset_is_read_and_filtered_like_the_training_set(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [record(i) for i in range(4)])
    held = write_jsonl(tmp_path / "held.jsonl", [record(10), record(11, finish="length")])
    data = load(train, eval_dataset=str(held))
    assert len(data.train) == 4 and [r["prompt"][0]["content"] for r in data.eval] == [
        "question 10"
    ]
    assert data.eval.column_names == ["prompt", "completion"]
    with pytest.raises(OpenkdError, match=r"--eval-dataset \S+: all 1 rows were filtered out"):
        load(train, eval_dataset=str(write_jsonl(tmp_path / "bad.jsonl", [record(1, "")])))
