"""`openkd make-tiny`: a tiny random Llama and BPE tokenizer built offline in seconds, and toy
prompts for the mock teacher's rules, so openkd runs end to end on a laptop without downloads."""

from openkd.tiny.model import TinySpec, build_tiny_model
from openkd.tiny.prompts import make_prompts

__all__ = ["TinySpec", "build_tiny_model", "make_prompts"]
