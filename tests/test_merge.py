"""`openkd merge`: shards of one run join into exactly the unsharded dataset; duplicates are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from openkd.tiny import make_prompts
from tests.conftest import read_jsonl, write_jsonl
from tests.helpers import error_line, invoke


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
    # Shard 2/3 is left out and the copy has no metadata: --allow-incomplete gets past that.
    proc = invoke("merge", shards[0], shards[1], copy, "-o", merged, "--allow-incomplete")
    assert proc.returncode == 1
    first_id = read_jsonl(shards[1])[0]["id"]
    assert f"duplicate id {first_id} in {shards[1]} and {copy}:1" in proc.stderr
    assert not merged.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.jsonl"]  # no temp files left


def _error(proc) -> str:
    """The one-line error a refused merge ends with (no traceback)."""
    assert proc.returncode == 1, proc.stderr
    return error_line(proc.stderr)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_existing_output_needs_overwrite(run_and_shards, tmp_path):
    _, _, shards = run_and_shards
    merged = tmp_path / "m.jsonl"
    assert invoke("merge", *shards, "-o", merged).returncode == 0
    proc = invoke("merge", *shards, "-o", merged)
    assert "m.jsonl exists; pass --overwrite" in _error(proc)

    # --overwrite replaces the earlier merge's openkd files (naming them first), and only them.
    stale = write_jsonl(tmp_path / "m.failed.jsonl", [{"id": "old failure"}])
    notes = tmp_path / "m.notes.txt"
    notes.write_text("mine")
    proc = invoke("merge", *shards, "-o", merged, "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert f"--overwrite: replacing {merged}" in proc.stderr and str(stale) in proc.stderr
    assert not stale.exists() and notes.read_text() == "mine"
    assert len(read_jsonl(merged)) == sum(len(read_jsonl(s)) for s in shards)


def test_overwrite_never_replaces_a_file_openkd_did_not_write(run_and_shards, tmp_path):
    _, _, shards = run_and_shards
    mine = write_jsonl(tmp_path / "m.jsonl", [{"id": "keep me"}])
    proc = invoke("merge", *shards, "-o", mine, "--overwrite")
    assert "is not an openkd output (no m.meta.json" in _error(proc)
    assert read_jsonl(mine) == [{"id": "keep me"}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.jsonl"]


def test_missing_shard_is_refused_unless_allow_incomplete(run_and_shards, tmp_path):
    _, _, shards = run_and_shards
    merged = tmp_path / "m.jsonl"
    proc = invoke("merge", shards[0], shards[2], "-o", merged)
    line = _error(proc)
    assert f"shard 1/3 is missing (no {shards[1]})" in line and "--allow-incomplete" in line
    assert list(tmp_path.iterdir()) == []  # refused before anything was written

    proc = invoke("merge", shards[0], shards[2], "-o", merged, "--allow-incomplete")
    assert proc.returncode == 0, proc.stderr
    assert "warning: --allow-incomplete: shard 1/3 is missing" in proc.stderr
    meta = json.loads((tmp_path / "m.meta.json").read_text())
    assert meta["status"] == "incomplete"
    assert [(m["shard"], m["status"]) for m in meta["merged_from"]] == [
        ("0/3", "complete"),
        ("2/3", "complete"),
        ("1/3", "missing"),
    ]
    assert len(read_jsonl(merged)) == len(read_jsonl(shards[0])) + len(read_jsonl(shards[2]))


def test_unfinished_shards_are_named(tmp_path):
    """A shard with failed prompts pending, and one killed mid-run (its metadata still says
    running), keep the merge from claiming a complete dataset."""
    dataset = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in make_prompts(40)])
    shards = []
    for i in range(2):
        proc = invoke(
            "generate", "--backend", "mock", "--teacher", "mock-teacher", "--dataset", dataset,
            "--output", tmp_path / "s" / "t.jsonl", "--shard", f"{i}/2",
            "--mock-fail", "^Reverse the words: [a-c]",
        )  # fmt: skip
        shards.append(Path(proc.stdout.strip()))
    failures = [len(read_jsonl(s.with_name(s.name.replace(".jsonl", ".failed.jsonl"))))
                for s in shards]  # fmt: skip
    assert all(failures), failures
    killed_meta = shards[1].with_name("t.shard-1-of-2.meta.json")
    meta = json.loads(killed_meta.read_text())
    killed_meta.write_text(json.dumps({**meta, "status": "running"}))
    before = _tree(tmp_path)

    merged = tmp_path / "out" / "m.jsonl"
    line = _error(invoke("merge", *shards, "-o", merged))
    assert f"shard 0/2 ({shards[0]}) is incomplete, {failures[0]} failed prompts pending" in line
    assert f"shard 1/2 ({shards[1]}) did not finish (status running" in line
    assert _tree(tmp_path) == before  # nothing written, no input touched

    proc = invoke("merge", *shards, "-o", merged, "--allow-incomplete")
    assert proc.returncode == 0, proc.stderr
    merged_meta = json.loads(merged.with_name("m.meta.json").read_text())
    assert merged_meta["status"] == "incomplete"
    assert merged_meta["counts"]["failed"]["rows"] == sum(failures)
    assert [m["status"] for m in merged_meta["merged_from"]] == ["incomplete", "running"]


def test_shards_of_different_counts_are_a_mismatch_not_a_duplicate(run_and_shards, tmp_path):
    root, _, shards = run_and_shards
    other = _generate(root / "p.jsonl", tmp_path / "t.jsonl", "--shard", "1/2")
    odd = Path(other.stdout.strip())
    line = _error(invoke("merge", shards[0], odd, "-o", tmp_path / "m.jsonl"))
    assert "different --shard counts" in line and "duplicate" not in line
    assert f"{shards[0]} is 0/3" in line and f"{odd} is 1/2" in line
    assert not (tmp_path / "m.jsonl").exists()


def test_merge_never_writes_an_input_or_under_a_file(run_and_shards, tmp_path):
    _, _, shards = run_and_shards
    before = _tree(shards[0].parent)
    line = _error(invoke("merge", *shards, "-o", shards[0], "--overwrite"))
    assert "is also an input shard" in line
    # A side file given as an input would be the merged output's eval file.
    side = tmp_path / "m.eval.jsonl"
    side.write_bytes(shards[0].with_name("t.shard-0-of-3.eval.jsonl").read_bytes())
    line = _error(invoke("merge", *shards, side, "-o", tmp_path / "m.jsonl", "--overwrite"))
    assert f"would write {side}, which is an input" in line
    assert _tree(shards[0].parent) == before

    blocker = tmp_path / "file"
    blocker.write_text("")
    line = _error(invoke("merge", *shards, "-o", blocker / "sub" / "m.jsonl"))
    assert f"--output {blocker / 'sub' / 'm.jsonl'} is not writable (Not a directory)" in line
