"""Prompt sources: every supported format loads, prompts are built as documented, errors name the fix."""

from __future__ import annotations

import json

import pytest

from openkd.data.prompts import PromptBuilder
from openkd.data.sources import iter_rows, load_source, selection
from openkd.errors import OpenkdError
from tests.conftest import write_jsonl

ROWS = [{"prompt": f"question {i}", "problem": f"{i} + {i}", "n": i} for i in range(6)]


def _all_rows(ds, positions, columns):
    return [pair for batch in iter_rows(ds, positions, columns, batch_size=4) for pair in batch]


@pytest.fixture(scope="module")
def formats(tmp_path_factory):
    """The same six rows as .jsonl, .json, .parquet, .csv, two .jsonl parts and save_to_disk."""
    from datasets import Dataset

    root = tmp_path_factory.mktemp("formats")
    ds = Dataset.from_list(ROWS)
    write_jsonl(root / "rows.jsonl", ROWS)
    (root / "rows.json").write_text(json.dumps(ROWS))
    ds.to_parquet(str(root / "rows.parquet"))
    ds.to_csv(str(root / "rows.csv"), index=False)
    write_jsonl(root / "parts" / "part-0.jsonl", ROWS[:3])
    write_jsonl(root / "parts" / "part-1.jsonl", ROWS[3:])
    ds.save_to_disk(str(root / "saved"))
    return root


@pytest.mark.parametrize(
    "name", ["rows.jsonl", "rows.json", "rows.parquet", "rows.csv", "parts/part-*.jsonl", "saved"]
)
def test_every_local_format_gives_the_same_rows(formats, name):
    ds = load_source(str(formats / name))
    rows = _all_rows(ds, range(len(ds)), ["prompt", "n"])
    assert [(i, r["prompt"], int(r["n"])) for i, r in rows] == [
        (i, f"question {i}", i) for i in range(6)
    ]


def test_selection_shuffles_then_cuts_deterministically(formats):
    ds = load_source(str(formats / "rows.jsonl"))
    order = selection(len(ds), max_samples=4, shuffle_seed=7)
    assert list(order) == list(selection(len(ds), max_samples=4, shuffle_seed=7))
    assert len(set(order)) == 4 and list(order) != sorted(order)  # shuffled, no repeats
    rows = _all_rows(ds, order, ["prompt"])
    # source_index is the row's position in the source dataset, whatever the order.
    assert [(i, r["prompt"]) for i, r in rows] == [(int(i), f"question {i}") for i in order]
    assert list(selection(6, max_samples=None, shuffle_seed=None)) == list(range(6))


def test_template_renders_sandboxed_and_names_missing_fields():
    builder = PromptBuilder(
        columns=["problem", "n"], source="d", template="Solve: {{ problem }} (#{{ n }})"
    )
    assert builder.columns == ["problem", "n"]
    assert builder.build({"problem": "1 + 1", "n": 3}, 0) == [
        {"role": "user", "content": "Solve: 1 + 1 (#3)"}
    ]
    with pytest.raises(OpenkdError, match=r"uses 'problme'.*columns are: problem, n"):
        PromptBuilder(columns=["problem", "n"], source="d", template="{{ problme }}")
    sneaky = PromptBuilder(columns=["problem"], source="d", template="{{ problem.__class__ }}")
    with pytest.raises(OpenkdError, match=r"row 4 of d: --prompt-template failed"):
        sneaky.build({"problem": "x"}, 4)


def test_messages_column_drops_trailing_assistant_and_system_prompt_replaces():
    builder = PromptBuilder(
        columns=["messages"], source="d", messages_column="messages", system_prompt="Be brief."
    )
    chat = [
        {"role": "system", "content": "old"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "old answer"},
    ]
    assert builder.build({"messages": chat}, 0) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
    ]
    with pytest.raises(OpenkdError, match=r"row 2, --messages-column 'messages': no user message"):
        builder.build({"messages": [{"role": "assistant", "content": "x"}]}, 2)


def test_prompt_column_accepts_trl_conversational_prompts():
    builder = PromptBuilder(columns=["prompt"], source="d")
    chat = [{"role": "user", "content": "hi"}]
    assert builder.build({"prompt": chat}, 0) == chat
    with pytest.raises(OpenkdError, match=r"row 5 of d: column 'prompt' is null, not text"):
        builder.build({"prompt": None}, 5)
    with pytest.raises(OpenkdError, match=r"row 6 of d: column 'prompt' is empty"):
        builder.build({"prompt": "  "}, 6)


def test_missing_column_lists_the_columns():
    with pytest.raises(OpenkdError, match=r"no column 'prompt' \(columns are: question, answer\)"):
        PromptBuilder(columns=["question", "answer"], source="d")


def test_missing_local_path_is_not_mistaken_for_a_hub_id(tmp_path):
    with pytest.raises(OpenkdError, match=r"no such file or directory"):
        load_source(str(tmp_path / "nope.jsonl"))
    with pytest.raises(OpenkdError, match=r"no files match"):
        load_source(str(tmp_path / "*.parquet"))
