"""Build a tiny causal LM offline in seconds: a byte-level BPE tokenizer and a random Llama.

It loads through the real `from_pretrained`, runs in vLLM's CPU backend (head size 32 is
one its attention supports) and trains with TRL, so the same directory can be teacher and
student. Nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from openkd import __version__

EOS = "<|im_end|>"
# make-tiny's mark on a directory it wrote: `--overwrite` replaces only such a directory.
MARKER = "openkd_tiny.json"
MARKER_FORMAT = "openkd.tiny/1"
PAD = "<|endoftext|>"
SPECIAL_TOKENS = [PAD, "<|im_start|>", EOS]

# ChatML. The assistant turn, its <|im_end|> included, is inside {% generation %} so
# assistant-only loss masks work, and no newline follows the final <|im_end|>: the last
# token of a training example is then exactly the end-of-turn (= EOS) token.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{%- if not loop.last %}{{- '\\n' }}{%- endif %}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class TinySpec:
    """Size of the tiny model. Head size = hidden_size / heads must be one vLLM CPU supports."""

    vocab_size: int = 2000
    hidden_size: int = 128
    intermediate_size: int = 256
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    max_position_embeddings: int = 1024
    seed: int = 0
    # Seed of the weights alone (None: `seed`): another value gives another initialisation with
    # the same tokenizer, e.g. a student for a tiny teacher's soft labels.
    weights_seed: int | None = None
    # Std of the random weights. At 0.3 the model decodes chaotically and greedy answers end at
    # EOS after widely varying lengths (from a few tokens to hundreds), like a real teacher's.
    init_std: float = 0.02


def build_tokenizer(spec: TinySpec):
    """A byte-level BPE tokenizer trained on generated text, with ChatML specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from openkd.tiny.prompts import corpus

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(seed=spec.seed), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
        model_max_length=spec.max_position_embeddings,
    )


def _marker(path: Path) -> dict | None:
    """The marker make-tiny left in `path`, or None when there is none (or it is not one)."""
    try:
        marker = json.loads((path / MARKER).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(marker, dict) or marker.get("format") != MARKER_FORMAT:
        return None
    return marker if isinstance(marker.get("files"), list) else None


def check_model_dir(out_dir: str | Path, *, overwrite: bool) -> None:
    """`out_dir` may take a new tiny model: it is new or empty, or (`overwrite`) holds exactly
    a tiny model make-tiny wrote, recognised by its marker file; never anything else."""
    from openkd.errors import ConfigError, OpenkdError
    from openkd.paths import check_writable

    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"DIR {out_dir} is a file; pass a directory for the model")
    try:
        check_writable(out, "DIR")
    except OpenkdError as err:  # a bad argument: exit status 2, like the other checks
        raise ConfigError(str(err)) from err
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not entries:
        return
    shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
    marker = _marker(out)
    if marker is None:
        what = (
            " (a trained student: it has openkd_run.json)" if "openkd_run.json" in entries else ""
        )
        raise OpenkdError(
            f"{out_dir} is not empty ({shown}){what} and make-tiny did not write it (no {MARKER}); "
            "choose another directory"
        )
    others = sorted(set(entries) - set(marker["files"]) - {MARKER})
    if others:
        raise OpenkdError(
            f"{out_dir} holds a tiny model make-tiny wrote, and also {', '.join(others[:4])}"
            f"{', ...' if len(others) > 4 else ''} (not make-tiny's); choose another directory"
        )
    if not overwrite:
        raise OpenkdError(
            f"{out_dir} already holds a tiny model ({shown}); pass --overwrite to replace it, or "
            "choose another directory"
        )


def build_tiny_model(
    out_dir: str | Path, spec: TinySpec | None = None, *, overwrite: bool = False
) -> Path:
    """Write tokenizer, config, generation_config and random float32 weights to `out_dir`.

    `out_dir` must be new or empty, or, with `overwrite`, a tiny model this function wrote
    (`check_model_dir`). The model is built in a temporary directory beside it and moved into
    place whole, with a marker (`MARKER`) listing its files and spec.
    """
    spec = spec or TinySpec()
    out = Path(out_dir).expanduser()
    check_model_dir(out, overwrite=overwrite)
    real = out.resolve()  # a symlinked DIR: the model goes where it points
    real.parent.mkdir(parents=True, exist_ok=True)
    staging = real.with_name(f".{real.name}.make-tiny-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        _write_model(staging, spec)
        _install(staging, real)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _install(staging: Path, out: Path) -> None:
    """Move the built model to `out`, replacing an empty directory or an earlier tiny model."""
    from openkd import console

    if out.is_dir() and any(out.iterdir()):
        names = [*(_marker(out) or {"files": []})["files"], MARKER]
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        console.warn(
            f"--overwrite: replacing the tiny model make-tiny wrote in {out} ({len(names)} "
            f"files: {shown})"
        )
        retired = out.with_name(f".{out.name}.make-tiny-old-{os.getpid()}")
        out.rename(retired)
        staging.rename(out)
        shutil.rmtree(retired)
    else:
        if out.is_dir():
            out.rmdir()
        staging.rename(out)


def _write_model(out: Path, spec: TinySpec) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out.mkdir()
    tokenizer = build_tokenizer(spec)
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    pad_id = tokenizer.convert_tokens_to_ids(PAD)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        initializer_range=spec.init_std,
        dtype="float32",
    )
    torch.manual_seed(spec.seed if spec.weights_seed is None else spec.weights_seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=eos_id, pad_token_id=pad_id, bos_token_id=None, do_sample=False
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    marker = {
        "format": MARKER_FORMAT,
        "openkd": __version__,
        "spec": dataclasses.asdict(spec),
        "files": sorted(p.name for p in out.iterdir()),
    }
    (out / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
