"""vLLM engine settings shared by the in-process teacher and the `--serve` server.

Both read their engine options from one function, so `--backend vllm` and
`--backend openai --serve` run the same engine and give the same greedy answers. The checks
here run before any engine starts: a start costs minutes on a GPU node.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from openkd.errors import ConfigError, OpenkdError, brief
from openkd.paths import looks_like_path, model_path, require_local_model

if TYPE_CHECKING:
    from openkd.generate.backends.spec import TeacherSpec

# Sampling defaults a model's generation_config.json may set that vLLM applies on top of a
# request's explicit fields (temperature, top_p, max_tokens, seed and stop are always sent).
GENERATION_CONFIG_KEYS = (
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "top_k",
    "min_p",
)


VLLM_MAX_LOGPROBS = 20  # vLLM's default max_logprobs

# Engine options openkd sets from its own flags; --vllm-args must not set them a second way.
OWN_OPTIONS = {
    "model": "--teacher",
    "revision": "--revision",
    "tensor_parallel_size": "--tensor-parallel-size",
    "data_parallel_size": "--data-parallel-size",
    "dtype": "--dtype",
    "gpu_memory_utilization": "--gpu-memory-utilization",
    "enforce_eager": "--enforce-eager",
    "trust_remote_code": "--trust-remote-code",
    "seed": "--seed",
    "max_model_len": "--max-model-len",
    "max_num_seqs": "--max-num-seqs",
}


def server_logprobs(k: int, temperature: float) -> int:
    """`top_logprobs` to ask a vLLM server for, to get the true top `k`. The server sends a
    position's first entries, and vLLM lists the sampled token first, then ranks 1, 2, ...:
    when sampling, a token ranked below `k` may be the sampled one and push rank `k` out, so ask
    for one more and keep the `k` best (a greedy answer's token is rank 1)."""
    return k + 1 if temperature > 0 else k


def check_vllm_args(vllm_args: dict[str, Any]) -> None:
    """Every --vllm-args key must be a vLLM engine option openkd does not set itself."""
    if not vllm_args:
        return
    for key in vllm_args:
        if key in OWN_OPTIONS:
            raise ConfigError(
                f"--vllm-args sets '{key}', which openkd sets from {OWN_OPTIONS[key]}; "
                f"pass {OWN_OPTIONS[key]} instead"
            )
    import dataclasses

    from vllm.engine.arg_utils import EngineArgs

    from openkd.config import did_you_mean

    known = {f.name for f in dataclasses.fields(EngineArgs)}
    for key in vllm_args:
        if key not in known:
            raise ConfigError(
                f"--vllm-args: '{key}' is not a vLLM engine option{did_you_mean(key, known)}; see "
                "`vllm serve --help` for them (written with underscores, e.g. kv_cache_dtype)"
            )


def engine_options(cfg: TeacherSpec) -> dict[str, Any]:
    """Keyword arguments for `vllm.LLM` (and, as flags, for the vLLM server)."""
    options: dict[str, Any] = {
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "dtype": cfg.dtype,
        "gpu_memory_utilization": cfg.gpu_memory_utilization,
        "enforce_eager": cfg.enforce_eager,
        "trust_remote_code": cfg.trust_remote_code,
        "seed": cfg.seed,
    }
    if cfg.revision is not None:
        options["revision"] = cfg.revision
    if cfg.max_model_len is not None:
        options["max_model_len"] = cfg.max_model_len
    if cfg.max_num_seqs is not None:
        options["max_num_seqs"] = cfg.max_num_seqs
    if cfg.logprobs and server_logprobs(cfg.logprobs, cfg.temperature) > VLLM_MAX_LOGPROBS:
        # vLLM refuses larger top-K requests otherwise (a --serve'd one gets K+1 when sampling)
        options["max_logprobs"] = server_logprobs(cfg.logprobs, cfg.temperature)
    options.update(cfg.vllm_args)
    return options


def llm_arguments(cfg: TeacherSpec) -> dict[str, Any]:
    """`vllm.LLM(**llm_arguments(cfg))`: the teacher, its `~` expanded, and the engine options."""
    return {"model": model_path(cfg.teacher), **engine_options(cfg)}


def as_cli_flags(options: dict[str, Any]) -> list[str]:
    """`{"max_model_len": 512, "enforce_eager": True}` -> `--max-model-len 512 --enforce-eager`.

    Booleans are always explicit (`--no-trust-remote-code`), so the command in the server log
    says exactly what ran; mappings and lists go as JSON, as vLLM's parser reads them.
    """
    flags: list[str] = []
    for key, value in options.items():
        name = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(name if value else "--no-" + name[2:])
        elif isinstance(value, dict | list):
            flags += [name, json.dumps(value)]
        elif value is not None:
            flags += [name, str(value)]
    return flags


def check_teacher(teacher: str) -> None:
    """A path-like teacher must be a model directory; Hub ids are left to vLLM."""
    if not looks_like_path(teacher):
        return
    require_local_model(teacher, "--teacher")
    path = Path(teacher).expanduser()
    if (
        path.is_dir()
        and not (path / "config.json").exists()
        and not (path / "params.json").exists()
    ):
        raise ConfigError(
            f"teacher path {teacher} has no config.json, so it is not a model directory "
            "(an adapter must be merged into its base model first)"
        )
    if path.is_dir() and not has_chat_template(path):
        raise ConfigError(
            f"teacher {teacher} has no chat template in its tokenizer files; use a chat/instruct "
            "model or add a chat_template to its tokenizer_config.json"
        )


def has_chat_template(model_dir: Path) -> bool:
    """True when a local model's tokenizer ships a chat template (file or config entry)."""
    if (model_dir / "chat_template.jinja").exists() or (model_dir / "chat_template.json").exists():
        return True
    config = model_dir / "tokenizer_config.json"
    if not config.exists():
        return True  # unusual layout (e.g. Mistral's tekken): let vLLM decide
    try:
        return bool(json.loads(config.read_text(encoding="utf-8")).get("chat_template"))
    except (OSError, ValueError):
        return True


def check_answer_fits(max_new_tokens: int, max_model_len: int | None, where: str) -> None:
    """vLLM rejects every request whose max_tokens exceeds the context: say so once, up front."""
    if max_model_len is not None and max_new_tokens > max_model_len:
        raise ConfigError(
            f"--max-new-tokens {max_new_tokens} exceeds the teacher's context length "
            f"{max_model_len} ({where}); lower --max-new-tokens or raise the context length"
        )


def preflight(cfg: TeacherSpec) -> None:
    """Everything that can be checked about a vLLM engine before starting one."""
    from openkd.generate.vllm.gpus import check_parallel_fits
    from openkd.versions import check_vllm

    check_teacher(cfg.teacher)
    check_vllm_args(cfg.vllm_args)
    check_answer_fits(cfg.max_new_tokens, cfg.max_model_len, "--max-model-len")
    check_parallel_fits(cfg.tensor_parallel_size, cfg.data_parallel_size)
    check_vllm()  # the installed vLLM has every API openkd calls


def engine_failed(teacher: str, err: BaseException, log_hint: str) -> OpenkdError:
    return OpenkdError(f"vLLM could not start teacher {teacher} ({brief(err)}); {log_hint}")
