"""`--push-to-hub`: upload the final student (weights, tokenizer, card, resolved config).

The token comes from the environment (`HF_TOKEN`) or `hf auth login`, never from openkd's
config, and is never printed. Checkpoints, TensorBoard runs and pickled training arguments stay
local. A failed push leaves the local student as it is; rerunning the same command resumes
from the final checkpoint (no training steps left), saves again and retries the push.
"""

from __future__ import annotations

import re
from pathlib import Path

from openkd.errors import OpenkdError, brief

LOCAL_ONLY = [
    "checkpoint-*",
    "checkpoint-*/**",
    "runs/**",
    "merged/**",
    "training_args.bin",
    "openkd_run.json",
    "*.tmp",
]
_TOKEN = re.compile(r"hf_[A-Za-z0-9]{8,}")


def push_folder(folder: Path, repo_id: str, *, private: bool, retry: str) -> str:
    """Create `repo_id` if needed and upload `folder` to it; the repo's URL."""
    try:
        from huggingface_hub import HfApi

        api = HfApi()
        repo = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            repo_type="model",
            commit_message="openkd train: distilled student",
            ignore_patterns=LOCAL_ONLY,
        )
    except Exception as exc:
        raise OpenkdError(
            f"push to {repo_id} failed ({_TOKEN.sub('hf_***', brief(exc, 200))}); the student is saved in {folder}; "
            f"check `hf auth whoami` / HF_TOKEN, then {retry}"
        ) from exc
    return str(getattr(repo, "url", None) or f"https://huggingface.co/{repo_id}")
