"""Arrow columns built from flat numpy arrays (no per-value Python objects) and read back."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def messages_type() -> Any:
    import pyarrow as pa

    return pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


def messages(rows: Sequence[list[dict[str, Any]]]) -> Any:
    """list<struct<role, content>>: chat messages, other keys dropped."""
    import pyarrow as pa

    plain = [[{"role": m.get("role"), "content": m.get("content")} for m in r] for r in rows]
    return pa.array(plain, type=messages_type())


def offsets(lengths: Sequence[int]) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(np.asarray(lengths, dtype=np.int64), out=out[1:])
    return out


def flat_list(parts: Sequence[np.ndarray], value_type: Any) -> Any:
    """list<value_type> with one list per part."""
    import pyarrow as pa

    values = np.concatenate(parts) if parts else np.zeros(0)
    return pa.LargeListArray.from_arrays(
        offsets([len(p) for p in parts]), pa.array(values, type=value_type)
    ).cast(pa.list_(value_type))


def nested_list(parts: Sequence[np.ndarray], value_type: Any) -> Any:
    """list<list<value_type>>: each part [T, W] becomes T lists of W values."""
    import pyarrow as pa

    widths = {p.shape[1] for p in parts if len(p)}
    width = widths.pop() if widths else 0
    flat = np.concatenate([p.reshape(-1) for p in parts]) if parts else np.zeros(0)
    total = sum(len(p) for p in parts)
    inner = pa.LargeListArray.from_arrays(
        np.arange(0, total * width + 1, max(width, 1), dtype=np.int64)[: total + 1],
        pa.array(flat, type=value_type),
    ).cast(pa.list_(value_type))
    return pa.LargeListArray.from_arrays(offsets([len(p) for p in parts]), inner).cast(
        pa.list_(pa.list_(value_type))
    )


def column_lists(column: Any) -> tuple[np.ndarray, Any]:
    """(row offsets from 0, values) of a list column (a ChunkedArray is combined first)."""
    import pyarrow as pa

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    offs = column.offsets.to_numpy(zero_copy_only=False).astype(np.int64)
    return offs - offs[0], column.flatten()


def flat_rows(column: Any, dtype: Any) -> list[np.ndarray]:
    """Each row of a list<T> column as a 1-d array."""
    offs, values = column_lists(column)
    flat = np.asarray(values.to_numpy(zero_copy_only=False), dtype=dtype)
    return [flat[offs[r] : offs[r + 1]] for r in range(len(offs) - 1)]


def nested_rows(column: Any, dtype: Any, width: int | None = None) -> list[np.ndarray]:
    """Each row of a list<list<T>> column as a [positions, width] array.

    `width` defaults to the narrowest position's; wider positions keep their first `width`
    values (as axolotl's loader does); a narrower one is a ValueError.
    """
    outer, inner = column_lists(column)
    inner_offsets, values = column_lists(inner)
    flat = np.asarray(values.to_numpy(zero_copy_only=False), dtype=dtype)
    widths = np.diff(inner_offsets)
    if width is None:
        width = int(widths.min()) if len(widths) else 0
    if len(widths) and (widths == width).all():  # the usual case: no loop over positions
        matrix = flat.reshape(len(widths), width)
    else:
        if len(widths) and widths.min() < width:
            raise ValueError(f"a position holds {int(widths.min())} values, fewer than {width}")
        index = inner_offsets[:-1, None] + np.arange(width)[None, :]
        matrix = flat[index] if len(widths) else np.zeros((0, width), dtype=dtype)
    return [matrix[outer[r] : outer[r + 1]] for r in range(len(outer) - 1)]
