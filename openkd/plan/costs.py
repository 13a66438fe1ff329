"""What a (student size, token budget) costs: teacher labelling, student training, sidecar.

The usual transformer rules, as the issue and the paper's Equation 9 (with F(N) = 2N) count:
training costs 6 N D FLOPs (forward and backward), inference 2 N FLOPs per token. N is the
non-embedding parameter count, so for a model whose vocabulary dominates (tiny ones) these
are lower bounds. D_S counts the answer tokens the student is trained on (repeats over
epochs included); the teacher labels each distinct answer token once, D_S / epochs, and also
reads each prompt token once. When stage 1's `<stem>.meta.json` is given, labelling time comes
from its measured completion tokens/s instead of FLOPs.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from openkd.errors import OpenkdError

SECONDS_PER_HOUR = 3600.0


def student_training_flops(n_s: float, d_s: float, tokens_per_answer_token: float = 1.0) -> float:
    """6 N_S D per trained token; `tokens_per_answer_token` > 1 adds the prompt tokens the
    student reads beside the D_S answer tokens it learns from."""
    return 6.0 * n_s * d_s * tokens_per_answer_token


def teacher_tokens(d_s: float, epochs: float = 1.0) -> float:
    """Distinct answer tokens the teacher must generate for D_S trained tokens."""
    return d_s / epochs


def teacher_flops(n_t: float, tokens: float, prompt_tokens_per_answer_token: float = 0.0) -> float:
    """2 N_T FLOPs per token generated, and per prompt token read."""
    return 2.0 * n_t * tokens * (1.0 + prompt_tokens_per_answer_token)


def sidecar_bytes(tokens: float, k: int, dtype: str = "float16") -> float:
    """`--logprobs K` sidecar size for `tokens` answer tokens (the sidecar's own format)."""
    from openkd.data.logprobs.format import bytes_per_token

    return tokens * bytes_per_token(k, dtype)


def gpu_hours(flops: float, gpu_flops: float) -> float:
    """Hours of GPUs sustaining `gpu_flops` FLOP/s each, to do `flops`."""
    return flops / gpu_flops / SECONDS_PER_HOUR


@dataclass(frozen=True)
class Labelling:
    """Stage 1 as measured: answer tokens/s over the run, GPUs it used, prompt tokens read per
    answer token."""

    tokens_per_second: float
    gpus: int
    prompt_tokens_per_answer_token: float
    source: str


def read_meta(path: Path) -> Labelling:
    """The labelling rate recorded in an `openkd generate` `<stem>.meta.json`."""
    try:
        meta = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise OpenkdError(
            f"--meta {path} is unreadable ({err}); pass the <stem>.meta.json openkd generate wrote"
        ) from err
    rate = ((meta.get("throughput") or {}) if isinstance(meta, dict) else {}).get(
        "completion_tokens_per_second"
    )
    if not isinstance(rate, int | float) or rate <= 0:
        raise OpenkdError(
            f"--meta {path} records no completion tokens/s (a run that never finished?); "
            "finish the generate run or leave --meta out to cost labelling in FLOPs"
        )
    config = meta.get("config") or {}
    gpus = int(config.get("tensor_parallel_size") or 1) * int(config.get("data_parallel_size") or 1)
    counts = meta.get("counts") or {}
    prompt = sum(int((counts.get(k) or {}).get("prompt_tokens") or 0) for k in ("train", "eval"))
    answer = sum(
        int((counts.get(k) or {}).get("completion_tokens") or 0) for k in ("train", "eval")
    )
    return Labelling(
        tokens_per_second=float(rate),
        gpus=gpus,
        prompt_tokens_per_answer_token=prompt / answer if answer else 0.0,
        source=str(path),
    )


@dataclass(frozen=True)
class Costs:
    """The cost of one candidate; GPU-hours assume `gpu_flops` sustained per GPU."""

    teacher_tokens: float
    teacher_flops: float
    labelling_gpu_hours: float
    student_flops: float
    student_gpu_hours: float
    total_flops: float
    total_gpu_hours: float
    sidecar_bytes: float | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def candidate_costs(
    n_s: float,
    d_s: float,
    *,
    n_t: float | None,
    gpu_flops: float,
    epochs: float = 1.0,
    tokens_per_answer_token: float = 1.0,
    labelling: Labelling | None = None,
    logprobs: int | None = None,
    logprobs_dtype: str = "float16",
) -> Costs:
    """Everything (N_S, D_S) costs with a teacher of N_T parameters (None: labelling unknown,
    counted as 0 FLOPs unless measured in `labelling`)."""
    tokens = teacher_tokens(d_s, epochs)
    prompt_ratio = labelling.prompt_tokens_per_answer_token if labelling else 0.0
    t_flops = teacher_flops(n_t, tokens, prompt_ratio) if n_t else 0.0
    if labelling is not None:
        label_hours = tokens / labelling.tokens_per_second * labelling.gpus / SECONDS_PER_HOUR
    else:
        label_hours = gpu_hours(t_flops, gpu_flops)
    s_flops = student_training_flops(n_s, d_s, tokens_per_answer_token)
    s_hours = gpu_hours(s_flops, gpu_flops)
    return Costs(
        teacher_tokens=tokens,
        teacher_flops=t_flops,
        labelling_gpu_hours=label_hours,
        student_flops=s_flops,
        student_gpu_hours=s_hours,
        total_flops=t_flops + s_flops,
        total_gpu_hours=label_hours + s_hours,
        sidecar_bytes=sidecar_bytes(tokens, logprobs, logprobs_dtype) if logprobs else None,
    )
