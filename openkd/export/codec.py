"""DistillKit's compressed top-k log-probabilities: the config, the encoder and the decoder.

The byte layout is DistillKit's `DistributionQuantizationConfig` format (arcee-ai/DistillKit,
`distillkit/compression/`), implemented here from its documented layout; for each position:

    compressed_logprobs = [exact values] [polynomial coefficients] [bin 1] [bin 2] ...
        exact values    the first `exact_k` (sorted, descending) log-probabilities, `exact_dtype`
        coefficients    one per `polynomial_terms` entry (`term_dtype`), least squares of the
                        values exact_k..k-1 against t = 0, 1, ... (or t in [0, 1], `normalize_t`):
                        an int i is the term t**i, "sqrt" and "exp" are sqrt(t) and exp(t)
        bin             a scale (`scale_dtype`) then `num_elements` residuals (values minus the
                        polynomial) quantised to `element_bits` signed levels, bit-packed; the
                        tail past the last bin is the polynomial alone
    bytepacked_indices = the k token ids in the same order, ceil(log2(d)) bits each

Every number is little-endian; bit packing is most significant bit first, each field padded to
whole bytes. With `delta_encoding` the stored values are v0, v1 - v0, v2 - v1, ... and the
decoder takes their running sum. The decoder returns values in `exact_dtype` precision, as
DistillKit's does, so a value's error is the tail's approximation error plus that rounding.

numpy has no bfloat16: `_round` rounds float32 to it (to nearest, ties to even, as torch does)
and `_encode`/`_decode` move it as raw 16-bit words.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

DType = Literal["float16", "bfloat16", "float32", "float64"]
WIDTH = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}
NUMPY = {"float16": np.float16, "float32": np.float32, "float64": np.float64}


class QuantizationBin(BaseModel):
    model_config = ConfigDict(extra="forbid")

    scale_dtype: DType
    element_bits: int = Field(gt=0, le=64)
    num_elements: int = Field(gt=0)


class CompressionConfig(BaseModel):
    """DistillKit's `logprob_compressor` / `compression_config.yaml` settings (same keys)."""

    model_config = ConfigDict(extra="forbid")

    d: int = Field(gt=0, description="Vocabulary size: token ids take ceil(log2(d)) bits.")
    k: int = Field(gt=0)
    exact_k: int = Field(ge=0)
    exact_dtype: DType = "float32"
    polynomial_terms: list[int | Literal["sqrt", "exp"]] | None = None
    term_dtype: DType = "float32"
    residual_bins: list[QuantizationBin] = Field(default_factory=list)
    delta_encoding: bool = True
    error_diffusion: bool = False
    normalize_t: bool = False

    @model_validator(mode="after")
    def _check(self) -> CompressionConfig:
        if self.k < self.exact_k:
            raise ValueError(f"exact_k ({self.exact_k}) must not exceed k ({self.k})")
        if self.exact_k < self.k and not self.polynomial_terms and not self.residual_bins:
            raise ValueError(
                "exact_k < k needs polynomial_terms or residual_bins for the other values"
            )
        if sum(b.num_elements for b in self.residual_bins) > self.k - self.exact_k:
            raise ValueError("the residual_bins hold more values than k - exact_k")
        return self

    @property
    def index_bits(self) -> int:
        # DistillKit computes it in float32; for d < 2**24 that is exact.
        return math.ceil(float(np.log2(np.float32(self.d))))

    @property
    def logprob_bytes(self) -> int:
        size = self.exact_k * WIDTH[self.exact_dtype]
        size += len(self.polynomial_terms or []) * WIDTH[self.term_dtype]
        for b in self.residual_bins:
            size += WIDTH[b.scale_dtype] + (b.element_bits * b.num_elements + 7) // 8
        return size

    @property
    def index_bytes(self) -> int:
        return (self.k * self.index_bits + 7) // 8

    @property
    def bytes_per_position(self) -> int:
        return self.logprob_bytes + self.index_bytes


def default_config(d: int, k: int, dtype: str) -> CompressionConfig:
    """Exact values in the sidecar's dtype up to top-32 (lossless); above, DistillKit's
    recommended capture settings: the top 16 exact, a polynomial for the tail."""
    exact_dtype: DType = "float32" if dtype == "float32" else "float16"
    if k <= 32:
        return CompressionConfig(d=d, k=k, exact_k=k, exact_dtype=exact_dtype, delta_encoding=False)
    return CompressionConfig(
        d=d,
        k=k,
        exact_k=16,
        exact_dtype=exact_dtype,
        polynomial_terms=[0, 1, 2, 3, 4, "sqrt"],
        term_dtype="float32",
        delta_encoding=False,
    )


# -- dtypes ------------------------------------------------------------------------------------


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    rounded[nan] = ((bits[nan] >> 16) | 0x40).astype(np.uint16)
    return rounded


def _from_bf16_bits(words: np.ndarray) -> np.ndarray:
    return (words.astype(np.uint32) << 16).view(np.float32)


def _round(x: np.ndarray, dtype: str) -> np.ndarray:
    """`x` rounded to `dtype`, held as float32 (float64 for float64)."""
    if dtype == "float64":
        return np.asarray(x, dtype=np.float64)
    if dtype == "bfloat16":
        return _from_bf16_bits(_bf16_bits(np.asarray(x, dtype=np.float32)))
    return np.asarray(x, dtype=NUMPY[dtype]).astype(np.float32)


def _encode(x: np.ndarray, dtype: str) -> np.ndarray:
    """[N, M] values as [N, M * width] little-endian bytes of `dtype`."""
    if dtype == "bfloat16":
        raw = _bf16_bits(x).astype("<u2")
    else:
        raw = np.asarray(x, dtype=np.dtype(NUMPY[dtype]).newbyteorder("<"))
    return np.ascontiguousarray(raw).view(np.uint8).reshape(x.shape[0], -1)


def _decode(raw: np.ndarray, dtype: str) -> np.ndarray:
    """[N, M * width] bytes as [N, M] values (float32, float64 for float64)."""
    raw = np.ascontiguousarray(raw)
    if dtype == "bfloat16":
        return _from_bf16_bits(raw.view("<u2")).reshape(raw.shape[0], -1)
    values = raw.view(np.dtype(NUMPY[dtype]).newbyteorder("<")).reshape(raw.shape[0], -1)
    return values.astype(np.float64 if dtype == "float64" else np.float32)


def _promote(a: str, b: str) -> str:
    """torch's result dtype for arithmetic between two float dtypes."""
    if a == b:
        return a
    if "float64" in (a, b):
        return "float64"
    return "float32"  # float32 with anything; float16 with bfloat16


# -- bits --------------------------------------------------------------------------------------


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """[N, M] non-negative integers as [N, ceil(M * bits / 8)] bytes, MSB first."""
    n, m = values.shape
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint64)
    planes = ((values.astype(np.uint64)[:, :, None] >> shifts) & np.uint64(1)).astype(np.uint8)
    return np.packbits(planes.reshape(n, m * bits), axis=1, bitorder="big")


def unpack_bits(raw: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The inverse of `pack_bits`: [N, bytes] -> [N, count] int64."""
    n = raw.shape[0]
    planes = np.unpackbits(np.ascontiguousarray(raw), axis=1, bitorder="big")[:, : count * bits]
    planes = planes.reshape(n, count, bits).astype(np.uint64)
    weights = np.uint64(1) << np.arange(bits - 1, -1, -1, dtype=np.uint64)
    return (planes * weights).sum(axis=2, dtype=np.uint64).astype(np.int64)


# -- the polynomial ----------------------------------------------------------------------------


def _design(cfg: CompressionConfig, t: int) -> np.ndarray:
    """[t, terms] as the decoder builds it: points and terms in `term_dtype`."""
    terms = cfg.polynomial_terms or []
    dtype = cfg.term_dtype
    wide = np.float64 if dtype == "float64" else np.float32
    if cfg.normalize_t:
        points = _round(np.linspace(0.0, 1.0, t), dtype).astype(wide)
    else:
        points = _round(np.arange(t, dtype=np.float64), dtype).astype(wide)
    columns = []
    with np.errstate(over="ignore"):
        for term in terms:
            if isinstance(term, int):
                column = points**term
            else:
                column = np.sqrt(points) if term == "sqrt" else np.exp(points)
            columns.append(_round(column, dtype))
    return np.stack(columns, axis=-1).astype(wide)


def _fit(cfg: CompressionConfig, coeffs: np.ndarray, t: int) -> np.ndarray:
    """The decoder's polynomial values [N, t] for [N, terms] coefficients (in `term_dtype`)."""
    x = _design(cfg, t)
    with np.errstate(over="ignore", invalid="ignore"):
        if cfg.term_dtype in ("float16", "bfloat16"):  # torch rounds each product, then the sum
            products = _round(x[None, :, :] * coeffs[:, None, :], cfg.term_dtype)
            return _round(products.sum(axis=-1, dtype=np.float32), cfg.term_dtype)
        return (x[None, :, :] * coeffs[:, None, :]).sum(axis=-1)


# -- quantisation ------------------------------------------------------------------------------


def _levels(bits: int) -> tuple[float, float, float]:
    """(lowest level, highest level, the level the largest |value| maps to)."""
    if bits == 1:
        return 0.0, 1.0, 1.0
    return -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1.0, 2.0 ** (bits - 1)


def _quantise(
    values: np.ndarray, bits: int, scale_dtype: str, carry: np.ndarray | None, diffuse: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scale [N, 1], levels [N, M] >= 0, carried error [N])."""
    low, high, top = _levels(bits)
    largest = np.abs(values).max(axis=1, keepdims=True)
    scale = np.where(largest == 0, 1.0, largest / top).astype(values.dtype)
    scale = _round(scale, scale_dtype).astype(values.dtype)
    scaled = values / scale
    if not diffuse:
        levels = np.clip(np.round(scaled), low, high) - low
        return scale, levels.astype(np.int64), np.zeros(len(values), dtype=values.dtype)
    error = np.zeros(len(values), dtype=values.dtype) if carry is None else carry
    levels = np.zeros(values.shape, dtype=np.int64)
    for i in range(values.shape[1]):
        current = scaled[:, i] + error
        level = np.clip(np.round(current), low, high)
        error = current - level
        levels[:, i] = (level - low).astype(np.int64)
    return scale, levels, error


def _dequantise(levels: np.ndarray, scale: np.ndarray, bits: int) -> np.ndarray:
    if bits == 1:
        return (levels.astype(np.float32) * 2.0 - 1.0) * scale
    low, _, _ = _levels(bits)
    return (levels + low).astype(np.float32) * scale


# -- encode / decode ---------------------------------------------------------------------------


def compress(
    cfg: CompressionConfig, ids: np.ndarray, logprobs: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(compressed_logprobs [N, logprob_bytes], bytepacked_indices [N, index_bytes]) uint8.

    `ids` and `logprobs` are [N, >= k]; each position's k most likely entries are kept,
    sorted by descending log-probability as DistillKit's decoder expects.
    """
    order = np.argsort(-logprobs, axis=1, kind="stable")[:, : cfg.k]
    values = np.take_along_axis(logprobs, order, axis=1).astype(np.float32)
    top_ids = np.take_along_axis(ids, order, axis=1)
    n = len(values)
    if cfg.delta_encoding:
        work = np.float64 if cfg.error_diffusion else np.float32
        wide = values.astype(work)
        deltas = np.concatenate([wide[:, :1], np.diff(wide, axis=1)], axis=1)
        if cfg.error_diffusion:
            out = np.zeros_like(values)
            error = np.zeros(n, dtype=np.float64)
            for i in range(cfg.k):
                current = deltas[:, i] + error
                out[:, i] = current.astype(np.float32)
                error = current - out[:, i].astype(np.float64)
            values = out
        else:
            values = deltas.astype(np.float32)
    chunks = [_encode(values[:, : cfg.exact_k], cfg.exact_dtype)] if cfg.exact_k else []
    tail = values[:, cfg.exact_k : cfg.k]
    if cfg.polynomial_terms:
        x = _design(cfg, tail.shape[1]).astype(np.float64)
        coeffs = tail.astype(np.float64) @ np.linalg.pinv(x).T
        coeffs = _round(coeffs, cfg.term_dtype)
        chunks.append(_encode(coeffs, cfg.term_dtype))
        residual = (tail - _fit(cfg, coeffs, tail.shape[1])).astype(np.float32)
    else:
        residual = tail
    start, carry = 0, None
    for b in cfg.residual_bins:
        part = residual[:, start : start + b.num_elements]
        scale, levels, carry = _quantise(
            part, b.element_bits, b.scale_dtype, carry, cfg.error_diffusion
        )
        chunks += [_encode(scale, b.scale_dtype), pack_bits(levels, b.element_bits)]
        start += b.num_elements
    packed = np.concatenate(chunks, axis=1) if chunks else np.zeros((n, 0), dtype=np.uint8)
    return packed, pack_bits(top_ids, cfg.index_bits)


def decompress(
    cfg: CompressionConfig, logprob_bytes: np.ndarray, index_bytes: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(ids [N, k] int64, log-probabilities [N, k] float32), as DistillKit's decoder gives them."""
    raw = np.ascontiguousarray(logprob_bytes, dtype=np.uint8)
    n, out = raw.shape[0], cfg.exact_dtype
    at = cfg.exact_k * WIDTH[cfg.exact_dtype]
    exact = _decode(raw[:, :at], cfg.exact_dtype) if cfg.exact_k else np.zeros((n, 0), np.float32)
    coeffs = None
    if cfg.polynomial_terms:
        size = len(cfg.polynomial_terms) * WIDTH[cfg.term_dtype]
        coeffs = _decode(raw[:, at : at + size], cfg.term_dtype)
        at += size
    residuals = []
    for b in cfg.residual_bins:
        scale = _decode(raw[:, at : at + WIDTH[b.scale_dtype]], b.scale_dtype)
        at += WIDTH[b.scale_dtype]
        size = (b.element_bits * b.num_elements + 7) // 8
        levels = unpack_bits(raw[:, at : at + size], b.element_bits, b.num_elements)
        at += size
        residuals.append(_dequantise(levels, scale.astype(np.float32), b.element_bits))
    tail = cfg.k - cfg.exact_k
    residual = np.zeros((n, tail), dtype=np.float32)
    if residuals:
        joined = np.concatenate(residuals, axis=1)
        residual[:, : joined.shape[1]] = joined
    residual = _round(residual, out)
    if coeffs is not None:
        kind = _promote(cfg.term_dtype, out)
        approx = _round(_fit(cfg, coeffs, tail) + residual, kind)
    else:
        kind, approx = out, residual
    values = np.concatenate([exact, approx.astype(exact.dtype)], axis=1)
    kind = _promote(out, kind)
    if cfg.delta_encoding:
        values = _round(np.cumsum(values.astype(np.float32), axis=1, dtype=np.float32), out)
    else:
        values = _round(values, kind)
    ids = unpack_bits(np.ascontiguousarray(index_bytes, dtype=np.uint8), cfg.index_bits, cfg.k)
    return ids, values.astype(np.float32)
