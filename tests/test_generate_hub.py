"""`--push-to-hub` against a mocked Hub: what is uploaded, and what a failed push leaves behind."""

from __future__ import annotations

import json
import sys
from unittest import mock

import pytest

from openkd.config import resolve
from openkd.generate.config import GenerateConfig
from openkd.generate.run import run
from tests.conftest import read_jsonl

REPO = "my-org/teacher-labels"


def _cfg(prompts_file, out, **extra) -> GenerateConfig:
    values = {
        "backend": "mock",
        "teacher": "mock-teacher",
        "dataset": str(prompts_file),
        "output": out,
        "push_to_hub": REPO,
        **extra,
    }
    return resolve(GenerateConfig, None, values)


@pytest.fixture
def hub():
    with (
        mock.patch("datasets.DatasetDict.push_to_hub", autospec=True) as push,
        mock.patch("huggingface_hub.HfApi.upload_file", autospec=True) as upload,
    ):
        yield push, upload


def test_push_uploads_splits_card_and_metadata(prompts_file, tmp_path, hub):
    push, upload = hub
    out = tmp_path / "t.jsonl"
    run(_cfg(prompts_file, out, private=True, eval_fraction=0.2))

    push.assert_called_once()
    (splits, repo), kwargs = push.call_args
    assert repo == REPO and kwargs["private"] is True
    assert splits["train"].num_rows == len(read_jsonl(out))
    assert splits["test"].num_rows == len(read_jsonl(tmp_path / "t.eval.jsonl"))
    assert splits["train"].num_rows + splits["test"].num_rows == 50

    uploads = {call.kwargs["path_in_repo"]: call.kwargs for call in upload.call_args_list}
    assert set(uploads) == {"README.md", "openkd_meta.json"}
    card = uploads["README.md"]["path_or_fileobj"].decode()
    assert f'load_dataset("{REPO}"' in card and "mock-teacher" in card
    assert all(u["repo_id"] == REPO and u["repo_type"] == "dataset" for u in uploads.values())
    meta = json.loads((tmp_path / "t.meta.json").read_text())
    assert meta["hub"]["repo_id"] == REPO and meta["hub"]["private"] is True


def _main(argv, monkeypatch) -> int:
    from openkd.cli import main

    monkeypatch.setattr(sys, "argv", ["openkd", *map(str, argv)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code


def test_failed_push_keeps_the_data_exits_nonzero_and_a_rerun_only_pushes(
    prompts_file, tmp_path, hub, monkeypatch, capsys
):
    push, upload = hub
    out = tmp_path / "t.jsonl"
    argv = ["generate", "--backend", "mock", "--teacher", "mock-teacher", "--dataset"]
    argv += [prompts_file, "--output", out, "--push-to-hub", REPO]

    push.side_effect = RuntimeError("401 Client Error: Unauthorized")
    assert _main(argv, monkeypatch) == 1
    err = capsys.readouterr().err
    assert f"push to {REPO} failed (RuntimeError: 401 Client Error: Unauthorized)" in err
    assert f"the data is safe in {out}" in err and "rerun the same command" in err
    assert len(read_jsonl(out)) == 50
    assert "hub" not in json.loads((tmp_path / "t.meta.json").read_text())
    upload.assert_not_called()

    push.side_effect = None
    push.reset_mock()
    assert _main(argv, monkeypatch) in (0, None)
    err = capsys.readouterr().err
    assert "50 prompts selected; 50 rows already in" in err and "nothing to label" in err
    push.assert_called_once()
    assert [c.kwargs["path_in_repo"] for c in upload.call_args_list] == [
        "README.md",
        "openkd_meta.json",
    ]
    assert len(read_jsonl(out)) == 50


def test_push_is_skipped_while_prompts_fail(prompts_file, tmp_path, hub, monkeypatch, capsys):
    push, _ = hub
    argv = ["generate", "--backend", "mock", "--teacher", "mock-teacher", "--dataset"]
    argv += [prompts_file, "--output", tmp_path / "t.jsonl", "--push-to-hub", REPO]
    assert _main([*argv, "--mock-fail", "tiger"], monkeypatch) == 1
    assert "the Hub push was skipped; rerun the same command" in capsys.readouterr().err
    push.assert_not_called()
