"""`--loss on-policy` across tokenizers: TRL's experimental GOLD trainer.

When the teacher's vocabulary differs from the student's, the student still samples its own
answers, and GOLD (`trl.experimental.gold`) scores them: it re-tokenises the prompt and the
sampled text with the teacher's tokenizer, groups the two token sequences by the bytes they
cover (a group closes where both tokenizers split alike; a word split 2:1 merges the
probabilities of its tokens), and compares the grouped distributions with ULD's sorted-
probability L1 (`--cross-tokenizer uld`) or, for `gold` (the default), GOLD's hybrid: a JSD
(`--kd-beta`) over the tokens both vocabularies share, ULD over the rest.

openkd keeps its data checks (prompts that leave no room for the answer are dropped and
counted), the non-finite guard, the run identity (the method is part of it), the time share of
sampling and the summary and card. --kd-temperature divides both models' logits before the
grouping (GOLD's ULD temperatures; --sampling-temperature is the sampling's). What GOLD does
its own way, and the summary says so: its on/offline draw per step (--kd-lambda) is not
replayed exactly after a resume, and it logs no exact reverse KL (the vocabularies differ:
there is no id-by-id KL to log).
"""

from __future__ import annotations

import time
import warnings
from typing import TYPE_CHECKING, Any

from openkd.errors import ConfigError
from openkd.train.guard import GuardedTrainer
from openkd.train.onpolicy.data import fit_datasets
from openkd.train.onpolicy.trainer import StepTimes

if TYPE_CHECKING:
    from openkd.train.config import TrainConfig
    from openkd.train.trainer import PreparedStats

warnings.filterwarnings("ignore", message="TRL currently supports vLLM versions")
# A prompt-only row gets an empty answer: GOLD's data pipeline needs one (it is only scored
# on offline steps, --kd-lambda below 1, and those read the dataset's answers instead).
EMPTY_ANSWER = [{"role": "assistant", "content": ""}]
PREFLIGHT_ROWS = 16


def _gold() -> Any:
    from trl.experimental.gold import GOLDConfig, GOLDTrainer

    return GOLDConfig, GOLDTrainer


# Pre-flight -------------------------------------------------------------------------------


def byte_level(teacher_tokenizer: Any, student_tokenizer: Any) -> bool:
    from openkd.distill.crosstok.vocab import is_byte_level

    return is_byte_level(teacher_tokenizer) and is_byte_level(student_tokenizer)


def _offsets(tokenizer: Any, text: str) -> list[tuple[int, int]]:
    """Byte (start, end) of each token of `text` (GOLD's own helper)."""
    from trl.experimental.utils import encode_with_byte_offsets

    [(_, offsets)] = encode_with_byte_offsets(
        tokenizer.backend_tokenizer, [text], add_special_tokens=False
    )
    return [(int(s), int(e)) for s, e in offsets]


def alignment(teacher_tokenizer: Any, student_tokenizer: Any, texts: list[str]) -> dict[str, Any]:
    """GOLD's byte-offset grouping on `texts`: the share of student tokens paired one to one
    with a teacher token, and in merged groups (a span split differently by the two)."""
    from trl.experimental.gold.gold_trainer import ULDLoss

    counts = {"positions": 0, "one_to_one": 0, "merged": 0}
    for text in texts:
        if not text:
            continue
        s_groups, t_groups = ULDLoss._align_by_byte_offsets(
            _offsets(student_tokenizer, text), _offsets(teacher_tokenizer, text)
        )
        for s, t in zip(s_groups, t_groups, strict=False):
            counts["positions"] += len(s)
            if not s or not t:
                continue
            counts["one_to_one" if len(s) == 1 and len(t) == 1 else "merged"] += len(s)
    return counts


def describe_alignment(counts: dict[str, Any], rows: int, what: str) -> str:
    n = counts["positions"]
    if not n:
        return f"alignment not measured: the first {rows} rows have no {what}"
    one, merged = counts["one_to_one"] / n, counts["merged"] / n
    return (
        f"on the first {rows} rows' {what}, {one + merged:.1%} of {n:,} student tokens align "
        f"with teacher tokens ({one:.1%} one to one, {merged:.1%} in merged spans)"
    )


# Configuration ----------------------------------------------------------------------------


def gold_kwargs(cfg: TrainConfig, base: dict[str, Any], method: str, teacher: Any) -> dict:
    """GOLDConfig keyword arguments: the Trainer settings of `base` (DistillationConfig's) that
    GOLDConfig has, and the on-policy flags in GOLD's terms."""
    import dataclasses

    config_class, _ = _gold()
    fields = {f.name for f in dataclasses.fields(config_class)}
    for key in cfg.sft_args:
        if key not in fields:
            raise ConfigError(
                f"sft_args.{key} is not a trl.experimental.gold.GOLDConfig field, and --loss "
                "on-policy across tokenizers trains with GOLD; drop it"
            )
    kwargs = {k: v for k, v in base.items() if k in fields}
    sampling = cfg.sampling_temperature or 1.0
    kwargs.update(
        temperature=sampling,  # GOLD samples at it
        top_p=cfg.sampling_top_p or 1.0,
        top_k=0,
        lmbda=cfg.lmbda,
        beta=cfg.beta,
        max_completion_length=cfg.completion_tokens,
        num_generations=cfg.samples_per_prompt,
        use_uld_loss=True,
        use_extended_uld=teacher["byte_level"],
        uld_use_hybrid_loss=method == "gold",
        uld_student_temperature=cfg.temperature,
        uld_teacher_temperature=cfg.temperature,
        teacher_tokenizer_name_or_path=teacher["path"],
        packing=False,
        dataset_num_proc=None,
    )
    return kwargs


def with_answers(dataset: Any) -> Any:
    """GOLD's data pipeline needs an answer per row: prompt-only rows get an empty one."""
    if dataset is None or "completion" in dataset.column_names:
        return dataset
    return dataset.map(lambda _: {"completion": EMPTY_ANSWER}, desc="Preparing prompts")


# Trainer ----------------------------------------------------------------------------------


class OpenkdGoldTrainer(GuardedTrainer, _gold()[1]):  # type: ignore[misc]
    """GOLD on-policy distillation with openkd's prompt checks, guard and summaries."""

    reverse_kl_kind = "none"
    use_vllm: bool

    def __init__(
        self,
        *args: Any,
        eos_id: int,
        samples_per_prompt: int,
        lmbda: float,
        max_length: int,
        method: str,
        **kwargs: Any,
    ) -> None:
        self.eos_id = eos_id
        self.samples_per_prompt = samples_per_prompt
        self.method = method
        self.prepared: dict[str, PreparedStats] = fit_datasets(kwargs, max_length, with_answers)
        self.times = StepTimes()
        super().__init__(*args, **kwargs)
        self.attach_guard()

    def _generate_on_policy_for_slices(self, slices: Any, on_policy_indices: Any) -> Any:
        started = time.perf_counter()
        try:
            return super()._generate_on_policy_for_slices(slices, on_policy_indices)
        finally:
            self.times.add("generate", time.perf_counter() - started)

    def _prepare_inputs(self, generation_batch: Any) -> Any:
        inputs = super()._prepare_inputs(generation_batch)
        if self.model.training:  # tokens trained: prompt and sample, over all processes
            import torch

            seen = inputs["attention_mask"].sum().reshape(1).to(torch.int64)
            self.state.num_input_tokens_seen += int(self.accelerator.gather(seen).sum())
        return inputs

    def training_step(self, *args: Any, **kwargs: Any):
        started = time.perf_counter()
        loss = super().training_step(*args, **kwargs)
        self.times.add("step", time.perf_counter() - started)
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self.model.training:
            shares = self.times.flush()
            if "generate_share" in shares:
                logs["generate_share"] = shares["generate_share"]
        super().log(logs, start_time)

    def run_results(self) -> dict[str, Any]:
        """For the run record, summary and card: the method; no reverse KL (see module doc)."""
        shares = self.times.shares(self.times.total)
        return {
            "cross_tokenizer_method": self.method,
            "reverse_kl_kind": self.reverse_kl_kind,
            "reverse_kl_start": None,
            "reverse_kl_end": None,
            "generate_share": round(shares["generate_share"], 4) if shares else None,
            "score_share": None,
        }
