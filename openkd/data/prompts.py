"""Turn one dataset row into the chat messages the teacher answers.

Three ways, checked against the dataset's columns before any row is read:
  - a text column (`--prompt-column`, default `prompt`) becomes one user message;
  - a chat column (`--messages-column`) is used as is, minus trailing assistant turns (so a
    dataset of finished conversations is re-answered by the teacher);
  - a Jinja template (`--prompt-template`) over the row's columns, rendered in Jinja's
    immutable sandbox with undefined names as errors.
`--system-prompt` goes first; it replaces a system message the chat column already has.
"""

from __future__ import annotations

from typing import Any

from openkd.data.schema import Message
from openkd.errors import OpenkdError

DEFAULT_PROMPT_COLUMN = "prompt"


def _columns_hint(columns: list[str]) -> str:
    shown = ", ".join(columns[:30]) + (", ..." if len(columns) > 30 else "")
    return f"columns are: {shown}"


class PromptBuilder:
    """Builds `list[Message]` from a row; `columns` says which columns to read."""

    def __init__(
        self,
        *,
        columns: list[str],
        source: str,
        prompt_column: str | None = None,
        messages_column: str | None = None,
        template: str | None = None,
        system_prompt: str | None = None,
        alternatives: str = "--messages-column NAME or --prompt-template",
    ) -> None:
        """`alternatives`: the caller's other ways to build a prompt, named in the error for a
        missing --prompt-column (empty for a command without them, such as `openkd eval`)."""
        self.source = source
        self.system_prompt = system_prompt
        self.messages_column = messages_column
        self.prompt_column: str | None = None
        self._template = None
        if messages_column is not None:
            if messages_column not in columns:
                raise OpenkdError(
                    f"--messages-column '{messages_column}' is not in --dataset {source}; "
                    f"{_columns_hint(columns)}"
                )
            self.columns = [messages_column]
        elif template is not None:
            self._template, used = _compile(template)
            if not used:
                raise OpenkdError(
                    f"--prompt-template {template!r} reads no column, so every row would get "
                    "the same prompt; name the row's columns in it, e.g. {{ "
                    f"{columns[0] if columns else 'problem'} }}}}"
                )
            missing = sorted(used - set(columns))
            if missing:
                names = ", ".join(f"'{m}'" for m in missing)
                raise OpenkdError(
                    f"--prompt-template uses {names}, which --dataset {source} does not have; "
                    f"{_columns_hint(columns)}"
                )
            self.columns = [c for c in columns if c in used] or columns[:1]
        else:
            column = prompt_column or DEFAULT_PROMPT_COLUMN
            if column not in columns:
                ways = "--prompt-column NAME" + (f", {alternatives}" if alternatives else "")
                raise OpenkdError(
                    f"--dataset {source} has no column '{column}' ({_columns_hint(columns)}); "
                    f"pass {ways}"
                )
            self.prompt_column = column
            self.columns = [column]

    def build(self, row: dict[str, Any], index: int) -> list[Message]:
        """The conversation for dataset row `index`; OpenkdError naming the row if it is unusable."""
        if self.messages_column is not None:
            where = f"row {index}, --messages-column '{self.messages_column}'"
            messages = _chat(row[self.messages_column], where)
        elif self._template is not None:
            messages = [self._user(self._render(row, index), index, "--prompt-template renders")]
        else:
            column = str(self.prompt_column)
            value = row[column]
            if isinstance(value, list):
                # TRL's conversational format keeps the chat in the `prompt` column itself.
                messages = _chat(value, f"row {index} of {self.source}: column '{column}'")
            else:
                messages = [self._user(value, index, f"column '{self.prompt_column}' is")]
        if self.system_prompt is not None:
            messages = [m for m in messages if m["role"] != "system"]
            messages.insert(0, Message(role="system", content=self.system_prompt))
        return messages

    def _user(self, text: Any, index: int, what: str) -> Message:
        if not isinstance(text, str):
            raise OpenkdError(
                f"row {index} of {self.source}: {what} {_kind(text)}, not text; "
                "clean or filter the dataset"
            )
        if not text.strip():
            raise OpenkdError(
                f"row {index} of {self.source}: {what} empty; filter out empty prompts first"
            )
        return Message(role="user", content=text)

    def _render(self, row: dict[str, Any], index: int) -> str:
        from jinja2 import TemplateError

        assert self._template is not None
        try:
            return self._template.render(**row)
        except TemplateError as exc:
            raise OpenkdError(
                f"row {index} of {self.source}: --prompt-template failed ({exc}); "
                "fix the template or the row"
            ) from exc


def _compile(source: str):
    """A sandboxed template and the top-level names it reads."""
    from jinja2 import StrictUndefined, TemplateSyntaxError, meta
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(
        undefined=StrictUndefined, keep_trailing_newline=True, autoescape=False
    )
    try:
        used = meta.find_undeclared_variables(env.parse(source))
        return env.from_string(source), set(used)
    except TemplateSyntaxError as exc:
        raise OpenkdError(
            f"--prompt-template is not valid Jinja ({exc.message}, line {exc.lineno}); "
            "fix the template"
        ) from exc


def _chat(value: Any, where: str) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise OpenkdError(
            f"{where}: expected a non-empty list of {{role, content}} messages, got {_kind(value)}"
        )
    messages: list[Message] = []
    for turn in value:
        if not isinstance(turn, dict) or not isinstance(turn.get("role"), str):
            raise OpenkdError(f"{where}: every message needs a 'role' and a text 'content'")
        content = turn.get("content")
        if not isinstance(content, str):
            raise OpenkdError(
                f"{where}: message content must be text, got {_kind(content)} "
                "(multimodal content is not supported)"
            )
        messages.append(Message(role=turn["role"], content=content))
    while messages and messages[-1]["role"] == "assistant":
        messages.pop()
    if not any(m["role"] == "user" for m in messages):
        raise OpenkdError(f"{where}: no user message to answer")
    return messages


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__
