"""Baseline for `openkd generate --backend vllm`: the same prompts in one `vllm.LLM.chat` call.

All prompts go to vLLM at once, its own advice for offline inference: the engine schedules
them itself and stays full until the last answer. Same engine options and sampling as openkd's
vLLM backend. Timed like openkd's labelling time: from the moment the engine is ready (engine
start excluded) until every answer is written to a JSONL file.

With `--logprobs K` it also keeps each answer's top-K log-probabilities the cheapest way vLLM
gives them: flat lists (`flat_logprobs`), vLLM's detokenizer off (it would decode every one of
the K alternatives), each answer decoded once at the end, and the [T, K] ids and float16 values
written to `<output>.logprobs.bin`, the work `openkd generate --logprobs K` does.

    python -m bench.baselines.raw_vllm --model DIR --prompts prompts.jsonl --output out.jsonl \
        --stats stats.json --max-tokens 128 [--dtype float32 --enforce-eager] [--logprobs 20]
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from bench.baselines.cli import generation_parser, read_rows


def top_k(choice: Any, k: int) -> tuple[Any, Any]:
    """[T, k] ids and float16 log-probabilities from vLLM's flat lists, which hold per position
    the sampled token and then ranks 1..k."""
    import numpy as np

    flat = choice.logprobs
    ids = np.asarray(flat.token_ids, dtype=np.int32).reshape(-1, k + 1)[:, 1:]
    values = np.asarray(flat.logprobs, dtype=np.float32).reshape(-1, k + 1)[:, 1:]
    return ids, values.astype(np.float16)


def main() -> None:
    parser = generation_parser(__doc__, server=False)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--max-model-len", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--logprobs", type=int, help="also keep the top-K log-probabilities")
    args = parser.parse_args()

    from vllm import LLM, SamplingParams

    engine_args = {"dtype": args.dtype, "enforce_eager": args.enforce_eager, "seed": args.seed}
    if args.max_model_len:
        engine_args["max_model_len"] = args.max_model_len
    t_engine = time.perf_counter()
    llm = LLM(model=args.model, **engine_args)
    start_seconds = time.perf_counter() - t_engine

    t0 = time.perf_counter()
    prompts = [row["prompt"] for row in read_rows(args.prompts)]
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    k = args.logprobs
    params = SamplingParams(
        temperature=0.0,
        top_p=1.0,
        max_tokens=args.max_tokens,
        seed=args.seed,
        logprobs=k,
        flat_logprobs=bool(k),
        detokenize=not k,
    )
    outputs = llm.chat(conversations, params, use_tqdm=False)
    tokenizer = llm.get_tokenizer() if k else None
    tokens = 0
    soft_path = f"{args.output}.logprobs.bin" if k else os.devnull
    with open(args.output, "w", encoding="utf-8") as fh, open(soft_path, "wb") as soft:
        for prompt, output in zip(prompts, outputs, strict=True):
            choice = output.outputs[0]
            tokens += len(choice.token_ids)
            text = choice.text
            if k:
                text = tokenizer.decode(choice.token_ids, skip_special_tokens=True)
                for array in top_k(choice, k):
                    soft.write(array.tobytes())
            row = {
                "prompt": prompt,
                "text": text,
                "finish_reason": choice.finish_reason,
                "completion_tokens": len(choice.token_ids),
            }
            fh.write(json.dumps(row) + "\n")
    seconds = time.perf_counter() - t0
    stats = {
        "rows": len(prompts),
        "completion_tokens": tokens,
        "seconds": seconds,
        "engine_start_seconds": start_seconds,
    }
    args.stats.write_text(json.dumps(stats))
    llm.llm_engine.engine_core.shutdown()


if __name__ == "__main__":
    main()
