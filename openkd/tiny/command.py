"""`openkd make-tiny`: its options checked before anything is written, then the model and the
prompts. Every size is bounded (a tiny model stays under `MAX_PARAMETERS`), the head layout is
one Llama can run, and the output paths are usable; each problem is a one-line ConfigError
naming the flag."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from openkd.errors import ConfigError, OpenkdError
from openkd.tiny.model import TinySpec, build_tiny_model, check_model_dir

MAX_HIDDEN = 8192
MAX_LAYERS = 64
MAX_INTERMEDIATE = 4 * MAX_HIDDEN
MAX_SEED = 2**63 - 1
MAX_INIT_STD = 1.0
MAX_PARAMETERS = 200_000_000  # 0.8 GB of float32 weights: "tiny" with room to spare
# Distinct prompts each toy task can make (sum: 10^4 + 10^6 number lists; half of that keeps
# the draw of distinct prompts quick), and a bound on the list held in memory.
MAX_PROMPTS = {"reverse": 1_000_000, "sum": 500_000}


def _in_range(flag: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise ConfigError(f"{flag} {value}: must be between {low:,} and {high:,}")


def parameters(spec: TinySpec) -> int:
    """The model's parameter count (tied embeddings), from its sizes alone."""
    head = spec.hidden_size // spec.heads
    attention = (
        2 * spec.hidden_size * spec.hidden_size + 2 * spec.hidden_size * spec.kv_heads * head
    )
    layer = attention + 3 * spec.hidden_size * spec.intermediate_size + 2 * spec.hidden_size
    return spec.vocab_size * spec.hidden_size + spec.layers * layer + spec.hidden_size


@dataclass(frozen=True)
class TinyOptions:
    """What `openkd make-tiny` was asked for; `spec()` checks it."""

    hidden_size: int = 128
    layers: int = 2
    heads: int | None = None  # default: hidden size / 32 (a head size vLLM CPU supports)
    kv_heads: int | None = None  # default: heads / 2
    intermediate_size: int | None = None  # default: 2 x hidden size
    seed: int = 0
    weights_seed: int | None = None
    init_std: float = 0.02
    num_prompts: int = 4000
    task: str = "reverse"

    def spec(self) -> TinySpec:
        """The model to build; ConfigError naming the flag for any value it cannot be built with."""
        _in_range("--hidden-size", self.hidden_size, 2, MAX_HIDDEN)
        _in_range("--layers", self.layers, 1, MAX_LAYERS)
        heads = self.heads if self.heads is not None else max(1, self.hidden_size // 32)
        _in_range("--heads", heads, 1, self.hidden_size)
        kv_heads = self.kv_heads if self.kv_heads is not None else max(1, heads // 2)
        _in_range("--kv-heads", kv_heads, 1, heads)
        if self.hidden_size % heads or heads % kv_heads or (self.hidden_size // heads) % 2:
            raise ConfigError(
                f"--hidden-size {self.hidden_size}, --heads {heads}, --kv-heads {kv_heads}: the "
                "hidden size must divide by --heads into an even head size (rotary embeddings "
                "rotate pairs; vLLM on CPU wants 32, 64, ...) and --heads by --kv-heads"
            )
        intermediate = self.intermediate_size
        intermediate = 2 * self.hidden_size if intermediate is None else intermediate
        _in_range("--intermediate-size", intermediate, 1, MAX_INTERMEDIATE)
        _in_range("--seed", self.seed, 0, MAX_SEED)
        if self.weights_seed is not None:
            _in_range("--weights-seed", self.weights_seed, 0, MAX_SEED)
        if not math.isfinite(self.init_std):
            raise ConfigError(f"--init-std {self.init_std}: not a finite number")
        if not 0 < self.init_std <= MAX_INIT_STD:
            raise ConfigError(
                f"--init-std {self.init_std:g}: must be > 0 and at most {MAX_INIT_STD:g} (the std "
                "of the random weights; 0.02 is usual, 0.3 makes a chaotic teacher)"
            )
        if self.task not in MAX_PROMPTS:
            raise ConfigError(f"--task {self.task}: use {' or '.join(MAX_PROMPTS)}")
        _in_range("--num-prompts", self.num_prompts, 1, MAX_PROMPTS[self.task])
        spec = TinySpec(
            hidden_size=self.hidden_size,
            intermediate_size=intermediate,
            layers=self.layers,
            heads=heads,
            kv_heads=kv_heads,
            seed=self.seed,
            weights_seed=self.weights_seed,
            init_std=self.init_std,
        )
        if (n := parameters(spec)) > MAX_PARAMETERS:
            raise ConfigError(
                f"--hidden-size {self.hidden_size}, --layers {self.layers}, --intermediate-size "
                f"{intermediate} make {n / 1e6:,.0f}M parameters ({4 * n / 1e9:.1f} GB of float32); "
                f"make-tiny builds at most {MAX_PARAMETERS / 1e6:,.0f}M, so lower them"
            )
        return spec


def check_prompts_path(prompts: Path, out_dir: Path, *, overwrite: bool) -> None:
    """`--prompts` must be a file make-tiny may write: not a directory, not inside the model
    directory (replaced as a whole), and not someone's file (`--overwrite` replaces only toy
    prompts, recognised by their first line)."""
    from openkd.paths import check_writable

    path = prompts.expanduser()
    if path.is_dir():
        raise ConfigError(f"--prompts {prompts} is a directory; pass a .jsonl file to write")
    if path.absolute().is_relative_to(out_dir.expanduser().absolute()):
        raise ConfigError(
            f"--prompts {prompts} lies inside the model directory {out_dir}, which make-tiny "
            "replaces as a whole; pass a path outside it"
        )
    try:
        check_writable(path, "--prompts")
    except OpenkdError as err:  # a bad argument: exit status 2, like the other checks
        raise ConfigError(str(err)) from err
    if path.is_file() and path.stat().st_size:
        if not overwrite:
            raise ConfigError(
                f"--prompts {prompts} exists; pass --overwrite to replace toy prompts make-tiny "
                "wrote, or another --prompts"
            )
        if not _looks_like_toy_prompts(path):
            raise ConfigError(
                f"--prompts {prompts} holds rows make-tiny did not write (its first line is not "
                "a toy-task prompt), and --overwrite replaces only make-tiny's; pass another "
                "--prompts"
            )


def _looks_like_toy_prompts(path: Path) -> bool:
    import json

    from openkd.tiny.tasks import REVERSE_PREFIX, SUM_PREFIX

    try:
        with open(path, encoding="utf-8") as fh:
            first = json.loads(fh.readline())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return (
        isinstance(first, dict)
        and list(first) == ["prompt"]
        and isinstance(first["prompt"], str)
        and first["prompt"].startswith((REVERSE_PREFIX, SUM_PREFIX))
    )


def make_tiny(
    out_dir: Path, options: TinyOptions, *, prompts: Path | None, overwrite: bool
) -> Path:
    """Check everything, then build the model (and write the prompts); the model's directory."""
    spec = options.spec()
    check_model_dir(out_dir, overwrite=overwrite)
    if prompts is not None:
        check_prompts_path(prompts, out_dir, overwrite=overwrite)
    path = build_tiny_model(out_dir, spec, overwrite=overwrite)
    if prompts is not None:
        from openkd.data.jsonl import write_jsonl_atomic
        from openkd.tiny.prompts import make_prompts

        rows = make_prompts(options.num_prompts, rule=options.task, seed=options.seed)
        target = prompts.expanduser()
        if target.is_file() and target.stat().st_size:  # checked: toy prompts, --overwrite
            from openkd import console

            console.warn(f"--overwrite: replacing the toy prompts make-tiny wrote in {prompts}")
        write_jsonl_atomic(target, ({"prompt": p} for p in rows))
    return path
