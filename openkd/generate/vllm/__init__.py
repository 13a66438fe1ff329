"""What only a vLLM teacher needs: its engine options and pre-start checks (`options`), GPU and
NUMA counting for tensor/data parallel (`gpus`), and the `--serve` server's lifecycle
(`server`). The in-process backend is `openkd.generate.backends.vllm`."""
