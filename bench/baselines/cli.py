"""The arguments and prompt file every generation baseline shares, so the bench calls them alike."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def generation_parser(doc: str, *, server: bool = True) -> argparse.ArgumentParser:
    """--model, --prompts, --output, --stats, --max-tokens (and --base-url for a server)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    if server:
        parser.add_argument("--base-url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--stats", type=Path, required=True)
    parser.add_argument("--max-tokens", type=int, required=True)
    return parser


def read_rows(path: Path) -> list[dict]:
    """The prompt file's rows (JSON Lines, one {"prompt": ...} object each)."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
