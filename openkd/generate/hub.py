"""`--push-to-hub`: upload the finished dataset, its card and its metadata to a Hub dataset repo.

The token comes from the environment (`HF_TOKEN`) or `hf auth login`, never from openkd's
config. A failed push leaves every local file as it was; rerunning the same command skips
generation (all rows are done) and pushes again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from openkd import console
from openkd.data.layout import META_IN_REPO, OutputFiles
from openkd.data.metadata import now
from openkd.errors import OpenkdError, brief

if TYPE_CHECKING:
    from openkd.data.metadata import GenerateMeta


def push(files: OutputFiles, meta: GenerateMeta, repo_id: str, *, private: bool) -> None:
    """`--push-to-hub REPO` after a complete run; the push is recorded in the metadata."""
    from openkd.generate.card import render_card

    if not meta.counts.train.rows:
        raise OpenkdError(f"{files.output} has no rows to push; nothing was uploaded")
    console.info(f"pushing {files.output} to the Hub dataset {repo_id} ...")
    card = render_card(meta, name=files.stem.name, repo_id=repo_id)
    push_dataset(files, repo_id, private=private, card=card)
    meta.hub = {"repo_id": repo_id, "private": private, "pushed_at": now()}
    meta.write(files.meta)
    console.info(f"pushed: https://huggingface.co/datasets/{repo_id}")


def push_dataset(files: OutputFiles, repo_id: str, *, private: bool, card: str) -> None:
    """Push train (and test, from the eval file) splits, then the card and the metadata."""
    try:
        from datasets import Dataset, DatasetDict
        from huggingface_hub import HfApi

        splits = {"train": Dataset.from_json(str(files.output))}
        if files.eval.is_file() and files.eval.stat().st_size > 0:
            splits["test"] = Dataset.from_json(str(files.eval))
        message = f"openkd generate: {files.output.name}"
        DatasetDict(splits).push_to_hub(repo_id, private=private, commit_message=message)
        api = HfApi()
        api.upload_file(
            path_or_fileobj=card.encode("utf-8"),
            path_in_repo="README.md",
            repo_id=repo_id,
            repo_type="dataset",
            commit_message=f"{message} (card)",
        )
        if files.logprobs.is_dir():  # soft labels: the Arrow parts, as they are
            api.upload_folder(
                folder_path=str(files.logprobs),
                path_in_repo=files.logprobs.name,
                repo_id=repo_id,
                repo_type="dataset",
                allow_patterns=["part-*.arrow"],
                commit_message=f"{message} (top-k log-probabilities)",
            )
        api.upload_file(
            path_or_fileobj=str(files.meta),
            path_in_repo=META_IN_REPO,
            repo_id=repo_id,
            repo_type="dataset",
            commit_message=f"{message} (metadata)",
        )
    except Exception as exc:
        raise OpenkdError(
            f"push to {repo_id} failed ({brief(exc, 200)}); the data is safe "
            f"in {files.output}; check `hf auth whoami` / HF_TOKEN and rerun the same command "
            "with --push-to-hub (no rows are regenerated)"
        ) from exc
