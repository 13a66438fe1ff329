"""Non-embedding parameters of a model from its config.json alone: no weights are loaded.

The laws count N without the token embeddings and the output head (the paper's Table 1).
Counted here: attention projections, MLP, norms, and the biases the architecture has. Dense
Llama-style decoders (llama, mistral, qwen2, qwen3, gemma, phi3, ...) and GPT-2 are known;
another decoder with the same config keys is counted as Llama-style, with a warning.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from openkd import console
from openkd.errors import OpenkdError

GATED_MLP = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"}
QKV_BIAS = {"qwen2"}  # q, k and v carry biases whatever attention_bias says
QK_NORM = {"qwen3", "gemma3_text"}
SANDWICH_NORM = {"gemma2", "gemma3_text"}  # norms before and after attention and MLP
MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def read_config(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir).expanduser() / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise OpenkdError(
            f"{path} does not exist: N_S is read from the model's config.json; pass the "
            "model directory openkd train wrote"
        ) from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise OpenkdError(
            f"{path} is unreadable ({err}); pass a model directory with a valid config.json"
        ) from err
    if not isinstance(data, dict):
        raise OpenkdError(f"{path} does not hold a JSON object")
    return data


def _need(cfg: dict[str, Any], key: str, where: str) -> int:
    value = cfg.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise OpenkdError(
            f"{where}: no positive integer {key!r}, so its non-embedding parameters cannot be "
            "counted; give N_S in a pilots file (JSONL with n_params) instead"
        )
    return value


def non_embedding_params(config: dict[str, Any], where: str = "config.json") -> int:
    """N of a dense decoder from its config (embeddings and output head excluded)."""
    cfg = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    assert isinstance(cfg, dict)
    kind = str(cfg.get("model_type") or config.get("model_type") or "")
    experts = [k for k in MOE_KEYS if isinstance(cfg.get(k), int) and cfg[k] > 1]
    if experts:
        raise OpenkdError(
            f"{where}: a mixture of experts ({experts[0]} = {cfg[experts[0]]}); the laws were "
            "fitted on dense models and N (total or active?) is ambiguous: give N_S in a pilots "
            "file (JSONL with n_params) instead"
        )
    if kind == "gpt2" or "n_embd" in cfg:
        return _gpt2(cfg, where)
    h = _need(cfg, "hidden_size", where)
    layers = _need(cfg, "num_hidden_layers", where)
    inter = _need(cfg, "intermediate_size", where)
    heads = _need(cfg, "num_attention_heads", where)
    kv = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or h // heads
    q, k = heads * head_dim, kv * head_dim
    attention = h * q + 2 * h * k + q * h
    if cfg.get("attention_bias"):
        attention += q + 2 * k + h
    elif kind in QKV_BIAS:
        attention += q + 2 * k
    mlp = 3 * h * inter  # gate, up, down
    if cfg.get("mlp_bias"):
        mlp += 2 * inter + h
    norms = (4 if kind in SANDWICH_NORM else 2) * h + (2 * head_dim if kind in QK_NORM else 0)
    if kind and kind not in GATED_MLP:
        console.warn(
            f"{where}: model_type {kind!r} is counted as a Llama-style decoder (gated MLP, "
            "RMSNorm); check N_S if its layout differs"
        )
    return layers * (attention + mlp + norms) + h


def _gpt2(cfg: dict[str, Any], where: str) -> int:
    h = _need(cfg, "n_embd", where)
    layers = _need(cfg, "n_layer", where)
    inner = cfg.get("n_inner") or 4 * h
    attention = h * 3 * h + 3 * h + h * h + h
    mlp = h * inner + inner + inner * h + h
    norms = 2 * 2 * h
    return layers * (attention + mlp + norms) + 2 * h


def model_params(model_dir: Path) -> int:
    """N of the model in `model_dir` (its config.json)."""
    return non_embedding_params(read_config(model_dir), where=str(Path(model_dir) / "config.json"))
