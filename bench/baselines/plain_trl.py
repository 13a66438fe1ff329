"""Baseline for `openkd train`: a plain TRL `SFTTrainer` script on the same data and student.

The settings openkd's run resolves to, written out by hand: conversational prompt/completion
rows, loss on the completion only, no bf16 or gradient checkpointing on CPU, a checkpoint at
the end. Nothing else: no pre-flight checks, token accounting or run records.

    python -m bench.baselines.plain_trl --model DIR --data teacher.jsonl --output-dir OUT \
        --max-steps 200 --batch-size 8 --max-length 256 --learning-rate 1e-3 [--packing]
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--max-steps", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--max-length", type=int, required=True)
    parser.add_argument("--learning-rate", type=float, required=True)
    parser.add_argument("--save-steps", type=int, default=500)
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--packing", action="store_true")
    args = parser.parse_args()

    import torch
    from datasets import load_dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    dataset = load_dataset("json", data_files=str(args.data), split="train")
    dataset = dataset.select_columns(["prompt", "completion"])
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    cuda = torch.cuda.is_available()
    config = SFTConfig(
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
        report_to="none",
        max_length=args.max_length,
        packing=args.packing,
        packing_strategy="bfd",
        completion_only_loss=True,
        use_cpu=not cuda,
    )
    trainer = SFTTrainer(
        model=args.model, args=config, train_dataset=dataset, processing_class=tokenizer
    )
    trainer.train()


if __name__ == "__main__":
    main()
