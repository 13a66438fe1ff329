"""Offline helpers: a tiny tokenizer + model builder and a learnable toy task."""

from openkd.testing.tasks import make_prompts, reverse_words, sum_numbers
from openkd.testing.tiny import TinySpec, build_tiny_model

__all__ = ["TinySpec", "build_tiny_model", "make_prompts", "reverse_words", "sum_numbers"]
