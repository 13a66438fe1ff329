"""Teacher backends behind one interface (`base.Backend`), imported lazily by name."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from openkd.generate.backends.base import Backend
    from openkd.generate.backends.spec import TeacherSpec

# backend name -> "module:class"; each class takes a TeacherSpec (`spec.py`) in its constructor.
REGISTRY = {
    "mock": "openkd.generate.backends.mock:MockBackend",
    "vllm": "openkd.generate.backends.vllm:VLLMBackend",
    "openai": "openkd.generate.backends.openai:OpenAIBackend",
    "distilabel": "openkd.generate.backends.distilabel:DistilabelBackend",
    "transformers": "openkd.generate.backends.transformers:TransformersBackend",
}


def make_backend(spec: TeacherSpec) -> Backend:
    module, cls = REGISTRY[spec.backend].split(":")
    return getattr(importlib.import_module(module), cls)(spec)
