"""openkd's benchmarks: `python -m bench` (or `just bench`) writes bench/RESULTS.md.

Every figure is a ratio against a baseline measured in the same run on the same machine: the
same work done with the libraries directly (vLLM, an OpenAI client, TRL), or openkd itself at
another size. One module per benchmark, each runnable alone: `python -m bench --only train`.
"""

# Run order: cheap ones first; `resume` reuses the 1M-prompt output of `generate_mock`.
BENCHMARKS = (
    "generate_mock",
    "resume",
    "generate_streaming",
    "train",
    "packing",
    "train_soft",
    "train_crosstok",
    "train_onpolicy",
    "train_onpolicy_served",
    "export",
    "generate_vllm",
    "generate_openai",
)
