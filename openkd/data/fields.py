"""Config fields of every command that reads prompts from a dataset: one wording, one default."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

PROMPTS_HELP = (
    "Prompts: Hub dataset id, .jsonl/.json/.parquet/.csv file or glob, or a save_to_disk directory."
)

Split = Annotated[str, Field(description="Dataset split to read.")]
Subset = Annotated[str | None, Field(description="Dataset configuration (subset) name.")]
PromptColumn = Annotated[
    str | None, Field(description="Column holding the prompt text (default: 'prompt').")
]
MessagesColumn = Annotated[
    str | None,
    Field(description="Column holding a chat list of {role, content} messages instead."),
]
