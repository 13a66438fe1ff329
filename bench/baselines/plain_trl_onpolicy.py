"""Baseline for `openkd train --loss on-policy`: a plain TRL `DistillationTrainer` script.

The settings openkd's run resolves to, written out by hand: conversational prompts, the student
sampling its answers in transformers (temperature 1, top-p 1, no top-k), the teacher loaded
beside it, reverse KL (beta 1, T 1), no bf16 on CPU. Nothing else: no pre-flight checks,
prompt-length filter, reverse-KL metric, step-time shares, guard or run records.

    python -m bench.baselines.plain_trl_onpolicy --model DIR --teacher DIR --data teacher.jsonl \
        --output-dir OUT --max-steps 40 --batch-size 8 --max-completion-length 32 \
        --learning-rate 1e-3
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--max-steps", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--max-completion-length", type=int, required=True)
    parser.add_argument("--learning-rate", type=float, required=True)
    parser.add_argument("--beta", type=float, default=1.0)
    parser.add_argument("--save-steps", type=int, default=500)
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()

    import torch
    from datasets import load_dataset
    from transformers import AutoTokenizer
    from trl import DistillationConfig, DistillationTrainer

    dataset = load_dataset("json", data_files=str(args.data), split="train")
    dataset = dataset.select_columns(["prompt"])
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    cuda = torch.cuda.is_available()
    config = DistillationConfig(
        output_dir=str(args.output_dir),
        per_device_train_batch_size=args.batch_size,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=0.03,
        bf16=cuda and torch.cuda.is_bf16_supported(),
        gradient_checkpointing=False,
        seed=args.seed,
        save_strategy="steps",
        save_steps=args.save_steps,
        logging_steps=args.logging_steps,
        logging_first_step=True,
        report_to="none",
        beta=args.beta,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        max_completion_length=args.max_completion_length,
        generation_kwargs={"temperature": 1.0},
        include_num_input_tokens_seen="no",
        use_cpu=not cuda,
    )
    trainer = DistillationTrainer(
        model=args.model,
        teacher_model=args.teacher,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.train()


if __name__ == "__main__":
    main()
