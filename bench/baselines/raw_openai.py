"""Baseline for `openkd generate --backend openai`: a bare async OpenAI client, same requests.

Sends every prompt as a chat completion with the same explicit sampling fields openkd sends
(temperature, top_p, max_tokens, seed), at most `--concurrency` in flight, and writes the
answers to a JSONL file. Timed from the first request until the file is written.

    python -m bench.baselines.raw_openai --base-url http://127.0.0.1:8000/v1 --model NAME \
        --prompts prompts.jsonl --output out.jsonl --stats stats.json --max-tokens 128
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from bench.baselines.cli import generation_parser, read_rows


async def answer_all(args: argparse.Namespace, prompts: list[str]) -> list[dict]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=args.base_url, api_key="EMPTY", timeout=600, max_retries=0)
    gate = asyncio.Semaphore(args.concurrency)

    async def one(prompt: str) -> dict:
        async with gate:
            response = await client.chat.completions.create(
                model=args.model,
                messages=[{"role": "user", "content": prompt}],
                temperature=0.0,
                top_p=1.0,
                max_tokens=args.max_tokens,
                seed=args.seed,
            )
        choice = response.choices[0]
        return {
            "prompt": prompt,
            "text": choice.message.content,
            "finish_reason": choice.finish_reason,
            "completion_tokens": response.usage.completion_tokens if response.usage else 0,
        }

    try:
        return await asyncio.gather(*(one(p) for p in prompts))
    finally:
        await client.close()


def main() -> None:
    parser = generation_parser(__doc__)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    prompts = [row["prompt"] for row in read_rows(args.prompts)]
    t0 = time.perf_counter()
    rows = asyncio.run(answer_all(args, prompts))
    with open(args.output, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(row) + "\n" for row in rows)
    seconds = time.perf_counter() - t0
    stats = {
        "rows": len(rows),
        "completion_tokens": sum(row["completion_tokens"] for row in rows),
        "seconds": seconds,
    }
    args.stats.write_text(json.dumps(stats))


if __name__ == "__main__":
    main()
