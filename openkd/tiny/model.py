"""Build a tiny causal LM offline in seconds: a byte-level BPE tokenizer and a random Llama.

It loads through the real `from_pretrained`, runs in vLLM's CPU backend (head size 32 is
one its attention supports) and trains with TRL, so the same directory can be teacher and
student. Nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

EOS = "<|im_end|>"
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


def build_tiny_model(out_dir: str | Path, spec: TinySpec | None = None) -> Path:
    """Write tokenizer, config, generation_config and random float32 weights to `out_dir`."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    spec = spec or TinySpec()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
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
    return out
