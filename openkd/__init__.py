"""openkd: two-stage distillation of large language models (hard labels, soft labels, on-policy)."""

__version__ = "0.1.0"
