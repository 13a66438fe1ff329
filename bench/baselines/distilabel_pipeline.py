"""Baseline for streaming generation: distilabel's Pipeline + TextGeneration(OpenAILLM), shaped
like Open R1's `src/open_r1/generate.py`.

The prompts go to `pipeline.run(dataset=...)` (distilabel loads them with a LoadDataFromDicts
step), TextGeneration sends them to the server in batches of `--input-batch-size` (Open R1's
default, 64) with greedy sampling and `--max-tokens`, and the resulting dataset is written as
JSONL. The pipeline's cache goes to `--cache-dir` (not ~/.cache/distilabel) and is not reused
(`use_cache=False`). Timed from the pipeline's start until the JSONL is written.

    python -m bench.baselines.distilabel_pipeline --base-url http://127.0.0.1:8000/v1 \
        --model NAME --prompts prompts.jsonl --output out.jsonl --stats stats.json \
        --max-tokens 1000 --cache-dir WORK/distilabel-cache
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from bench.baselines.cli import generation_parser, read_rows


def main() -> None:
    parser = generation_parser(__doc__)
    parser.add_argument("--cache-dir", type=Path, required=True)
    parser.add_argument("--input-batch-size", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()

    from distilabel.models import OpenAILLM
    from distilabel.pipeline import Pipeline
    from distilabel.steps.tasks import TextGeneration

    rows = read_rows(args.prompts)
    t0 = time.perf_counter()
    with Pipeline(name="openkd-bench-distilabel", cache_dir=args.cache_dir) as pipeline:
        TextGeneration(
            llm=OpenAILLM(
                base_url=args.base_url,
                model=args.model,
                api_key="EMPTY",
                timeout=args.timeout,
                max_retries=0,
                generation_kwargs={"temperature": 0.0, "max_new_tokens": args.max_tokens},
            ),
            input_mappings={"instruction": "prompt"},
            input_batch_size=args.input_batch_size,
        )
    distiset = pipeline.run(
        dataset=rows, dataset_batch_size=args.input_batch_size * 1000, use_cache=False
    )
    answers = distiset["default"]["train"]
    answers.to_json(args.output, lines=True)
    seconds = time.perf_counter() - t0

    tokens = answered = 0
    for row in answers:
        if row.get("generation") is None:  # distilabel's row for a failed request
            continue
        answered += 1
        meta = row.get("distilabel_metadata") or {}
        stats = meta.get("statistics_text_generation_0") or {}
        tokens += int(stats.get("output_tokens") or 0)
    args.stats.write_text(
        json.dumps(
            {
                "rows": answered,
                "rows_written": len(answers),
                "completion_tokens": tokens,
                "seconds": seconds,
            }
        )
    )


if __name__ == "__main__":
    main()
