"""The shared state of one bench run: its work directory, environment and cached inputs.

Inputs (the tiny model, prompt files, training labels) are built once per work directory and
reused by every benchmark and later runs; outputs of measured runs are rewritten each time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench import proc

# Prompt files are prefixes of one 1M-prompt file: make_prompts is prefix-stable for a seed.
PROMPT_SEED = 7
MAX_PROMPTS = 1_000_000


@dataclass
class Context:
    workdir: Path
    env: dict[str, str]

    @classmethod
    def create(cls, workdir: Path) -> Context:
        workdir = workdir.resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
            # The datasets cache of the runs lives here, not in ~/.cache (see generate_mock).
            "HF_DATASETS_CACHE": str(workdir / "hf-datasets-cache"),
        }
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        # One OpenMP thread per process unless the caller says otherwise: on a busy CPU,
        # spinning OpenMP threads made tiny-model training steps ~10x slower (measured here).
        env.setdefault("OMP_NUM_THREADS", "1")
        return cls(workdir, env)

    def path(self, *parts: str) -> Path:
        return self.workdir.joinpath(*parts)

    def run(
        self, label: str, cmd: Sequence[str], *, log: str, timeout: float = 900
    ) -> proc.Measured:
        return proc.run(
            cmd, log=self.path("logs", f"{log}.log"), env=self.env, label=label, timeout=timeout
        )

    # --- cached inputs -----------------------------------------------------------------------

    def tiny_model(self) -> Path:
        """The tiny float32 Llama + tokenizer of the test suite, built offline once."""
        return self._built_model("tiny-model", "the tiny model")

    def tiny_teacher(self) -> Path:
        """The tiny model's architecture and tokenizer with other random weights
        (`TinySpec(weights_seed=1)`): a teacher for the tiny student."""
        from openkd.tiny import TinySpec

        return self._built_model("tiny-teacher", "the tiny teacher", TinySpec(weights_seed=1))

    def chaotic_model(self) -> Path:
        """The tiny Llama with large random weights (`TinySpec(seed=2, init_std=0.3)`): it
        decodes chaotically, and its greedy answers end at EOS after anything from a few tokens
        to hundreds, a heavy-tailed spread like a real teacher's."""
        from openkd.tiny import TinySpec

        return self._built_model(
            "tiny-model-chaotic", "the chaotic tiny model", TinySpec(seed=2, init_std=0.3)
        )

    def _built_model(self, name: str, what: str, spec=None) -> Path:
        out = self.path("assets", name)
        if not (out / "config.json").exists() or not (out / "tokenizer.json").exists():
            from openkd.tiny import build_tiny_model

            proc.console.print(f"  building {what}")
            build_tiny_model(out, spec)
        return out

    def prompts(self, n: int) -> Path:
        """A JSONL file of `n` distinct toy prompts in a `prompt` column."""
        if n > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS:,} prompts")
        path = self.path("assets", f"prompts-{n}.jsonl")
        if path.exists():
            return path
        master = self.path("assets", f"prompts-{MAX_PROMPTS}.jsonl")
        if not master.exists():
            from openkd.tiny import make_prompts

            with proc.console.status(
                f"  writing {MAX_PROMPTS:,} prompts (once per work directory)"
            ):
                prompts = make_prompts(MAX_PROMPTS, seed=PROMPT_SEED)
                _write_atomic(master, "".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
        if n == MAX_PROMPTS:
            return master
        with open(master, encoding="utf-8") as fh:
            head = "".join(line for _, line in zip(range(n), fh, strict=False))
        _write_atomic(path, head)
        return path

    def teacher_labels(self, n: int, logprobs: int | None = None) -> Path:
        """`openkd generate --backend mock` answers to `n` prompts: the training data.

        With `logprobs` K the mock reads the tiny model's tokenizer and also writes its
        synthetic top-K log-probabilities to the `<stem>.logprobs/` sidecar.
        """
        name = f"labels-{n}" + (f"-top{logprobs}" if logprobs else "")
        out = self.path("assets", name, "teacher.jsonl")
        meta = out.with_name("teacher.meta.json")
        if (
            out.exists()
            and meta.exists()
            and json.loads(meta.read_text()).get("status") == "complete"
        ):
            return out
        teacher = ["--teacher", str(self.tiny_model())] if logprobs else ["--teacher", "mock"]
        extra = ["--logprobs", str(logprobs)] if logprobs else []
        self.run(
            f"labelling {n:,} prompts with the mock teacher (training data"
            + (f", top-{logprobs} log-probabilities)" if logprobs else ")"),
            proc.openkd_command(
                "generate",
                "--backend",
                "mock",
                *teacher,
                "--mock-rule",
                "reverse",
                "--dataset",
                self.prompts(n),
                "--output",
                out,
                "--overwrite",
                *extra,
            ),
            log=f"assets-{name}",
        )
        return out


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
