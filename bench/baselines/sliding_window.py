"""Baseline for streaming generation: a sliding window of requests over every prompt, shaped like
Open R1's `scripts/generate_reasoning.py`.

One asyncio task per request, at most `--concurrency` at once: whenever one finishes, the next
prompt's request starts, so the server always has `--concurrency` requests, with no barrier
between batches. Each answer is appended to the JSONL file (and flushed) as it lands. The same
HTTP client as openkd's openai backend (AsyncOpenAI, retries off) sends the same explicit
sampling fields (temperature, top_p, max_tokens, seed). Timed from the first request until the
last answer is written.

    python -m bench.baselines.sliding_window --base-url http://127.0.0.1:8000/v1 --model NAME \
        --prompts prompts.jsonl --output out.jsonl --stats stats.json --max-tokens 1000 \
        --concurrency 256
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import TextIO

from bench.baselines.cli import generation_parser, read_rows


async def answer_all(args: argparse.Namespace, prompts: list[str], out: TextIO) -> tuple[int, int]:
    """(rows, completion tokens) once every prompt's answer is in `out`."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=args.base_url, api_key="EMPTY", timeout=600, max_retries=0)

    async def one(index: int, prompt: str) -> int:
        response = await client.chat.completions.create(
            model=args.model,
            messages=[{"role": "user", "content": prompt}],
            temperature=0.0,
            top_p=1.0,
            max_tokens=args.max_tokens,
            seed=args.seed,
        )
        choice = response.choices[0]
        tokens = response.usage.completion_tokens if response.usage else 0
        row = {
            "index": index,
            "prompt": prompt,
            "text": choice.message.content,
            "finish_reason": choice.finish_reason,
            "completion_tokens": tokens,
        }
        out.write(json.dumps(row) + "\n")
        out.flush()
        return tokens

    window: set[asyncio.Task[int]] = set()
    rows = tokens = 0
    try:
        for index, prompt in enumerate(prompts):
            if len(window) >= args.concurrency:
                done, window = await asyncio.wait(window, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    tokens += task.result()  # a failed request stops the run
                    rows += 1
            window.add(asyncio.create_task(one(index, prompt)))
        for task in asyncio.as_completed(window):
            tokens += await task
            rows += 1
        window = set()
    finally:
        for task in window:
            task.cancel()
        await asyncio.gather(*window, return_exceptions=True)
        await client.close()
    return rows, tokens


def main() -> None:
    parser = generation_parser(__doc__)
    parser.add_argument("--concurrency", type=int, default=256, help="requests in flight")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.concurrency < 1:
        parser.error("--concurrency must be at least 1")

    prompts = [row["prompt"] for row in read_rows(args.prompts)]
    t0 = time.perf_counter()
    with open(args.output, "w", encoding="utf-8") as out:
        rows, tokens = asyncio.run(answer_all(args, prompts, out))
    seconds = time.perf_counter() - t0
    args.stats.write_text(
        json.dumps({"rows": rows, "completion_tokens": tokens, "seconds": seconds})
    )


if __name__ == "__main__":
    main()
