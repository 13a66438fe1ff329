"""`--backend transformers`: batched `generate` from a local or Hub model, no server, no vLLM.

Meant for small models on a CPU (tests, the tiny demo, `openkd eval` of a tiny student) and
as a fallback where vLLM is not installed. Prompts are rendered with the tokenizer's chat
template, left-padded, and decoded greedily unless a temperature is set. Each request ends
with "stop" when an end-of-sequence token (from the generation config and the tokenizer) or
a stop string was produced, and "length" when `max_new_tokens` ran out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from openkd.data.schema import FINISH_LENGTH, FINISH_STOP, Message
from openkd.errors import OpenkdError, brief
from openkd.generate.backends.base import BatchedBackend, Completion, Sampling
from openkd.paths import model_path
from openkd.system import free_memory

if TYPE_CHECKING:
    from openkd.generate.backends.spec import TeacherSpec

# Prompts per forward pass: big enough to keep a CPU busy, small enough that left padding
# and the KV cache stay cheap. Prompts are sorted by length first, so padding is small.
MICRO_BATCH = 32
DEFAULT_IN_FLIGHT = 256  # prompts sorted by length together; answered MICRO_BATCH at a time
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}
DTYPES |= {"float16": "float16", "fp16": "float16", "half": "float16"}


def render_prompt(tokenizer: Any, messages: list[Message]) -> list[int]:
    """Token ids of `messages` plus the assistant header, as the chat template renders them
    (and as TRL renders the prompt part of a training example)."""
    return list(
        tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
    )


def first_stop(text: str, stop: tuple[str, ...]) -> int | None:
    """Index of the earliest stop string in `text`, or None."""
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return min(hits) if hits else None


def split_at_eos(
    token_ids: list[int], eos_ids: set[int], pad_id: int | None
) -> tuple[list[int], bool]:
    """Generated ids up to (not including) the first EOS, and whether an EOS was produced.

    `generate` pads rows that finished early with `pad_id`; those pads come after the EOS, so
    cutting at the EOS removes them too.
    """
    for i, token in enumerate(token_ids):
        if token in eos_ids:
            return token_ids[:i], True
    if pad_id is not None and pad_id not in eos_ids:
        while token_ids and token_ids[-1] == pad_id:
            token_ids = token_ids[:-1]
    return token_ids, False


def torch_dtype(dtype: str, device: str) -> Any:
    """The torch dtype for `--dtype` on `device`; "auto" is float32 on CPU, the checkpoint's on GPU."""
    import torch

    if dtype == "auto":
        # CPUs run float32 several times faster than bfloat16.
        return torch.float32 if device == "cpu" else "auto"
    name = DTYPES.get(dtype.lower())
    if name is None:
        raise OpenkdError(
            f"--dtype {dtype} is not one transformers can load; use auto, float32, bfloat16 "
            "or float16"
        )
    return getattr(torch, name)


def load_causal_lm(
    name: str, *, revision: str | None = None, trust_remote_code: bool = False, dtype: str = "auto"
) -> tuple[Any, Any]:
    """(model in eval mode on the GPU if there is one, else the CPU; its tokenizer).

    OpenkdError with the fix when the model cannot be loaded or has no chat template.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    kwargs = {"revision": revision, "trust_remote_code": trust_remote_code}
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path(name), **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            model_path(name), dtype=torch_dtype(dtype, device), **kwargs
        )
    except (OSError, ValueError) as exc:
        raise OpenkdError(
            f"could not load model {name} with transformers ({brief(exc)}); "
            "pass a model directory or a Hub id you can access"
        ) from exc
    if not tokenizer.chat_template:
        raise OpenkdError(
            f"{name} has no chat template, so prompts cannot be rendered; use an instruct/chat "
            "model or add a chat_template to its tokenizer_config.json"
        )
    loaded: Any = model  # transformers' stubs type `.to` for a model class, not an instance
    return loaded.to(device).eval(), tokenizer


def stop_on_text(tokenizer: Any, stop: tuple[str, ...], prompt_width: int) -> Any:
    """Stopping criteria ending each row once its answer text contains a stop string.

    Unlike `generate(stop_strings=...)`, it looks at the answer only, never at the prompt
    (a prompt ending in "\\n" plus an answer starting with "\\n" is not a "\\n\\n" stop),
    which is how vLLM and OpenAI servers apply stop strings.
    """
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    # A stop string completes within its own length in tokens (plus a few for merges).
    window = max(len(s) for s in stop) + 4

    class StopOnText(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            tails = input_ids[:, prompt_width:][:, -window:]
            texts = tokenizer.batch_decode(tails, skip_special_tokens=True)
            hits = [first_stop(text, stop) is not None for text in texts]
            return torch.tensor(hits, dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([StopOnText()])


class TransformersBackend(BatchedBackend):
    """A Hugging Face causal LM answering with `model.generate`, in float32 on CPU."""

    name = "transformers"

    def __init__(self, cfg: TeacherSpec) -> None:
        super().__init__()
        self.group = cfg.concurrency or DEFAULT_IN_FLIGHT
        self.model_name = cfg.teacher
        self.revision = cfg.revision
        self.trust_remote_code = cfg.trust_remote_code
        self.dtype = cfg.dtype
        self.micro_batch = min(self.group, MICRO_BATCH)
        self.max_model_len = cfg.max_model_len
        self.model: Any = None
        self.tokenizer: Any = None
        self.eos_ids: set[int] = set()
        self.pad_id: int | None = None
        self.context: int | None = None

    def start(self) -> None:
        model, tokenizer = load_causal_lm(
            self.model_name,
            revision=self.revision,
            trust_remote_code=self.trust_remote_code,
            dtype=self.dtype,
        )
        tokenizer.padding_side = "left"
        eos = model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        if not eos_ids:
            raise OpenkdError(
                f"{self.model_name} defines no end-of-sequence token (generation_config.json or "
                "tokenizer); every answer would run to --max-new-tokens"
            )
        pad_id = tokenizer.pad_token_id
        if pad_id is None:
            pad_id = min(eos_ids)
            tokenizer.pad_token_id = pad_id
        self.model, self.tokenizer = model, tokenizer
        self.eos_ids, self.pad_id = eos_ids, pad_id
        self.context = self.max_model_len or getattr(
            model.config.get_text_config(), "max_position_embeddings", None
        )

    def versions(self) -> dict[str, str]:
        import torch
        import transformers

        return {"transformers": transformers.__version__, "torch": torch.__version__}

    def close(self) -> None:
        if self.model is None:
            return
        self.model = None
        free_memory()

    def render(self, messages: list[Message]) -> list[int]:
        return render_prompt(self.tokenizer, messages)

    def in_flight(self) -> int:
        return self.group

    def generate_batch(self, batch: list[list[Message]], sampling: Sampling) -> list[Completion]:
        if self.model is None:
            raise OpenkdError("the transformers backend was used before start(); this is a bug")
        results: list[Completion | None] = [None] * len(batch)
        prompts: list[tuple[int, list[int]]] = []
        for i, messages in enumerate(batch):
            ids = self.render(messages)
            if self.context is not None and len(ids) >= self.context:
                results[i] = Completion.failure(
                    f"prompt has {len(ids)} tokens; the model's context is {self.context}"
                )
            else:
                prompts.append((i, ids))
        prompts.sort(key=lambda item: len(item[1]))
        for start in range(0, len(prompts), self.micro_batch):
            chunk = prompts[start : start + self.micro_batch]
            for (i, _), completion in zip(
                chunk, self._generate([p for _, p in chunk], sampling), strict=True
            ):
                results[i] = completion
        return [r if r is not None else Completion.failure("not generated") for r in results]

    def _generate(self, prompts: list[list[int]], sampling: Sampling) -> list[Completion]:
        import torch
        from transformers import GenerationConfig

        budget = sampling.max_new_tokens
        if self.context is not None:
            budget = min(budget, self.context - max(len(p) for p in prompts))
        greedy = sampling.temperature == 0.0
        config = GenerationConfig(
            max_new_tokens=budget,
            do_sample=not greedy,
            temperature=None if greedy else sampling.temperature,
            top_p=None if greedy else sampling.top_p,
            top_k=None,
            eos_token_id=sorted(self.eos_ids),
            pad_token_id=self.pad_id,
        )
        padded = self.tokenizer.pad({"input_ids": prompts}, padding=True, return_tensors="pt")
        device = self.model.device
        extra = {}
        if sampling.stop:
            width = padded["input_ids"].shape[1]
            extra["stopping_criteria"] = stop_on_text(self.tokenizer, sampling.stop, width)
        if not greedy:
            torch.manual_seed(sampling.seed)
        try:
            with torch.inference_mode():
                output = self.model.generate(
                    input_ids=padded["input_ids"].to(device),
                    attention_mask=padded["attention_mask"].to(device),
                    generation_config=config,
                    **extra,
                )
        except torch.OutOfMemoryError as err:
            raise OpenkdError(
                f"out of memory generating {len(prompts)} answers at once; lower --concurrency"
            ) from err
        new_tokens = output[:, padded["input_ids"].shape[1] :].tolist()
        return [
            self._completion(prompt, ids, sampling)
            for prompt, ids in zip(prompts, new_tokens, strict=True)
        ]

    def _completion(
        self, prompt: list[int], generated: list[int], sampling: Sampling
    ) -> Completion:
        answer_ids, ended = split_at_eos(generated, self.eos_ids, self.pad_id)
        text = self.tokenizer.decode(answer_ids, skip_special_tokens=True)
        cut = first_stop(text, sampling.stop)
        if cut is not None:
            text, ended = text[:cut], True
        return Completion(
            text=text,
            finish_reason=FINISH_STOP if ended else FINISH_LENGTH,
            prompt_tokens=len(prompt),
            # Like vLLM, the EOS token the model produced counts as a completion token.
            completion_tokens=len(answer_ids) + (1 if ended and cut is None else 0),
        )
