"""`openkd merge`: shards of one run join into exactly the unsharded dataset; duplicates are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from openkd.tiny import make_prompts
from tests.conftest import read_jsonl, write_jsonl
from tests.test_generate_mock import invoke


def _generate(dataset: Path, output: Path, *args: str):
    proc = invoke(
        "generate", "--backend", "mock", "--teacher", "mock-teacher", "--dataset", dataset,
        "--output", output, "--eval-fraction", "0.2", "--max-new-tokens", "4", *args,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc


def _canon(*paths: Path) -> list[str]:
    return sorted(json.dumps(r, sort_keys=True) for p in paths if p.exists() for r in read_jsonl(p))


@pytest.fixture(scope="module")
def run_and_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    prompts = make_prompts(120)
    # Repeated prompts must land in one shard, or merged shards would collide.
    dataset = write_jsonl(root / "p.jsonl", [{"prompt": p} for p in prompts + prompts[:15]])
    whole = root / "whole" / "t.jsonl"
    _generate(dataset, whole)
    shards = []
    for i in range(3):
        proc = _generate(dataset, root / "shards" / "t.jsonl", "--shard", f"{i}/3")
        shards.append(Path(proc.stdout.strip()))
    return root, whole, shards


def test_merged_shards_equal_the_unsharded_run(run_and_shards):
    root, whole, shards = run_and_shards
    assert [s.name for s in shards] == [f"t.shard-{i}-of-3.jsonl" for i in range(3)]
    sizes = [len(read_jsonl(s)) for s in shards]
    assert all(sizes), sizes  # every shard got work

    merged = root / "merged" / "all.jsonl"
    proc = invoke("merge", *shards, "-o", merged)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(merged)
    for suffix in (".jsonl", ".eval.jsonl", ".truncated.jsonl"):
        ours, theirs = merged.with_name("all" + suffix), whole.with_name("t" + suffix)
        assert _canon(ours) == _canon(theirs), suffix
    assert len(_canon(merged, merged.with_name("all.eval.jsonl"))) > 0

    meta = json.loads(merged.with_name("all.meta.json").read_text())
    whole_meta = json.loads(whole.with_name("t.meta.json").read_text())
    assert meta["counts"] == whole_meta["counts"]
    assert meta["tokens"] == whole_meta["tokens"]
    assert meta["fingerprint"] == whole_meta["fingerprint"]
    assert [m["shard"] for m in meta["merged_from"]] == ["0/3", "1/3", "2/3"]
    assert "| train |" in merged.with_name("all.README.md").read_text()

    # The merged output resumes like the unsharded one: nothing left to label.
    again = invoke(
        "generate", "--backend", "mock", "--teacher", "mock-teacher", "--dataset",
        root / "p.jsonl", "--output", merged, "--eval-fraction", "0.2", "--max-new-tokens", "4",
    )  # fmt: skip
    assert again.returncode == 0 and "nothing to label" in again.stderr, again.stderr


def test_duplicate_ids_are_rejected_naming_both_files(run_and_shards, tmp_path):
    _, _, shards = run_and_shards
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(shards[1].read_bytes())
    merged = tmp_path / "m.jsonl"
    proc = invoke("merge", shards[0], shards[1], copy, "-o", merged)
    assert proc.returncode == 1
    first_id = read_jsonl(shards[1])[0]["id"]
    assert f"duplicate id {first_id} in {shards[1]} and {copy}:1" in proc.stderr
    assert not merged.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.jsonl"]  # no temp files left


def test_existing_output_needs_overwrite(run_and_shards, tmp_path):
    _, _, shards = run_and_shards
    merged = write_jsonl(tmp_path / "m.jsonl", [{"id": "keep me"}])
    proc = invoke("merge", *shards, "-o", merged)
    assert proc.returncode == 1 and "exists; pass --overwrite" in proc.stderr
    assert read_jsonl(merged) == [{"id": "keep me"}]
    assert invoke("merge", *shards, "-o", merged, "--overwrite").returncode == 0
    assert len(read_jsonl(merged)) == sum(len(read_jsonl(s)) for s in shards)
