"""`--vllm-args`: engine options users tune reach `vllm.LLM` and the `--serve` server alike, and a
wrong key fails before any engine starts, naming it."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from openkd.errors import ConfigError
from openkd.generate.backends.spec import teacher_spec
from openkd.generate.config import GenerateConfig
from openkd.generate.vllm.options import check_vllm_args, engine_options, llm_arguments
from openkd.generate.vllm.server import vllm_server_command
from tests.conftest import run_cli, write_jsonl
from tests.helpers import error_line

TUNED = {
    "quantization": "fp8",
    "kv_cache_dtype": "fp8",
    "max_num_batched_tokens": 16384,
    "enable_prefix_caching": True,
    "speculative_config": {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4},
}


def config(**extra) -> GenerateConfig:
    return GenerateConfig(
        **{"teacher": "org/teacher", "dataset": "d.jsonl", "backend": "vllm", **extra}
    )


def test_json_flag_and_yaml_mapping_give_the_same_options() -> None:
    import json

    from_flag = config(vllm_args=json.dumps(TUNED))
    assert from_flag.vllm_args == TUNED
    options = engine_options(teacher_spec(from_flag))
    assert options["quantization"] == "fp8" and options["speculative_config"]["method"] == "ngram"
    assert options["tensor_parallel_size"] == 1  # openkd's own options stay


@pytest.mark.slow
def test_served_command_carries_them_and_vllms_parser_accepts_it(tmp_path: Path) -> None:
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cfg = config(
        backend="openai", serve=True, vllm_args=TUNED, output=tmp_path / "t.jsonl",
        data_parallel_size=2,
    )  # fmt: skip
    cmd = vllm_server_command(teacher_spec(cfg), 8123)
    # The parser of vLLM's command line (vllm.entrypoints.cli.main) with its `serve` subcommand.
    parser = FlexibleArgumentParser()
    ServeSubcommand().subparser_init(parser.add_subparsers(dest="subparser"))
    args = parser.parse_args(cmd[3:])
    assert args.subparser == "serve" and args.model_tag == "org/teacher"
    assert args.served_model_name == ["org/teacher"] and args.port == 8123
    # Unset: `vllm serve` then runs one API server per data-parallel replica.
    assert args.data_parallel_size == 2 and args.api_server_count is None
    assert args.quantization == "fp8" and args.kv_cache_dtype == "fp8"
    assert args.max_num_batched_tokens == 16384 and args.enable_prefix_caching is True
    assert args.speculative_config["num_speculative_tokens"] == 4


@pytest.mark.parametrize(
    ("vllm_args", "message"),
    [
        (
            {"quantisation": "fp8"},
            r"'quantisation' is not a vLLM engine option \(did you mean 'quantization'\?\)",
        ),
        (
            {"dtype": "bfloat16"},
            r"sets 'dtype', which openkd sets from --dtype; pass --dtype instead",
        ),
    ],
)
@pytest.mark.slow
def test_unknown_or_owned_keys_are_named(vllm_args: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_vllm_args(vllm_args)


def test_bad_json_and_wrong_backend_are_config_errors() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="is not valid JSON"):
        config(vllm_args="{quantization: fp8}")
    with pytest.raises(ValidationError, match="must be a JSON object"):
        config(vllm_args="[1, 2]")
    with pytest.raises(ValidationError, match="--vllm-args configures a vLLM engine"):
        config(backend="mock", vllm_args={"quantization": "fp8"})


@pytest.mark.slow
def test_cli_unknown_key_fails_before_the_engine_starts(tiny_model: Path, tmp_path: Path) -> None:
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Reverse the words: a b"}])
    out = tmp_path / "t.jsonl"
    t0 = time.monotonic()
    result = run_cli(
        "generate", "--teacher", tiny_model, "--dataset", prompts, "--output", out,
        "--backend", "vllm", "--vllm-args", '{"enable_prefix_cache": true}', timeout=180,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    line = error_line(result.stderr)
    assert "'enable_prefix_cache' is not a vLLM engine option" in line
    assert "did you mean 'enable_prefix_caching'" in line
    assert "loading teacher" not in result.stderr  # no engine was started
    assert not out.exists()
    assert time.monotonic() - t0 < 120


def test_answer_text_decodes_like_vllms_fast_detokenizer(tmp_path: Path):
    """With --logprobs openkd decodes answers itself (vLLM's detokenizer off): the stop token is
    not text, and an answer cut inside a multi-byte character ends before it, as in vLLM."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from openkd.generate.backends.vllm import answer_text
    from openkd.tiny import build_tiny_model

    tokenizer = AutoTokenizer.from_pretrained(build_tiny_model(tmp_path / "tiny"))
    raw = tokenizer._tokenizer
    prompt = tokenizer.encode("Reverse the words: a b", add_special_tokens=False)

    def output(text_ids: list[int], finish: str) -> SimpleNamespace:
        choice = SimpleNamespace(token_ids=text_ids, finish_reason=finish)
        return SimpleNamespace(outputs=[choice], prompt_token_ids=prompt)

    answer = tokenizer.encode(" b a café", add_special_tokens=False)
    eos = tokenizer.eos_token_id
    assert answer_text(raw, output([*answer, eos], "stop")) == " b a café"
    cut = tokenizer.encode(" b a €", add_special_tokens=False)  # the € is 3 byte tokens
    assert tokenizer.decode(cut[:-1]).endswith("\ufffd")  # what a plain decode would give
    assert answer_text(raw, output(cut[:-1], "length")) == " b a "
    assert answer_text(raw, output(cut, "length")) == " b a €"


def test_flat_logprobs_give_the_same_top_k_as_the_per_position_dicts():
    """vLLM's flat layout (sampled token, then ranks 1..k per position) is read without Python
    dicts; any other layout falls back to sorting each position's entries."""
    from types import SimpleNamespace

    import numpy as np

    from openkd.data.logprobs import top_k_arrays
    from openkd.generate.backends.vllm import _positions, _ranked_top_k

    rng = np.random.default_rng(0)
    k, flat = (
        4,
        SimpleNamespace(start_indices=[], end_indices=[], token_ids=[], logprobs=[], ranks=[]),
    )
    for _ in range(6):
        ids = rng.choice(1000, k, replace=False).tolist()
        values = sorted(rng.normal(size=k).tolist(), reverse=True)
        sampled = int(rng.integers(k))
        flat.start_indices.append(len(flat.token_ids))
        flat.token_ids += [ids[sampled], *ids]
        flat.logprobs += [values[sampled], *values]
        flat.ranks += [sampled + 1, *range(1, k + 1)]
        flat.end_indices.append(len(flat.token_ids))
    fast = _ranked_top_k(flat, k, "float16")
    slow = top_k_arrays(_positions(flat), k, "float16")
    assert fast is not None
    assert fast[0].tolist() == slow[0].tolist() and fast[1].tolist() == slow[1].tolist()
    assert fast[0].dtype == np.int32 and fast[1].dtype == np.float16
    flat.ranks[1] = 2  # not ranks 1..k in order: the general path decides
    assert _ranked_top_k(flat, k, "float16") is None


def test_a_teacher_path_with_a_tilde_reaches_vllm_expanded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """openkd's checks expand `~`; vLLM does not: it must get the expanded path (the client
    still asks the server for the teacher as typed, the name it is served under)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    home_teacher = str(tmp_path / "models" / "teacher")
    cfg = config(teacher="~/models/teacher", output=tmp_path / "t.jsonl")
    assert llm_arguments(teacher_spec(cfg))["model"] == home_teacher
    served = cfg.model_copy(update={"backend": "openai", "serve": True})
    cmd = vllm_server_command(teacher_spec(served), 8123)
    assert cmd[3:5] == ["serve", home_teacher]
    assert cmd[cmd.index("--served-model-name") + 1] == "~/models/teacher"
    hub = teacher_spec(config(teacher="org/teacher"))  # a Hub id
    assert llm_arguments(hub)["model"] == "org/teacher"


@pytest.mark.slow
def test_transformers_loads_a_model_under_a_tilde(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from openkd.generate.backends.transformers import load_causal_lm

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "tiny").symlink_to(tiny_model)
    model, tokenizer = load_causal_lm("~/tiny")
    assert tokenizer.eos_token is not None and model.config.vocab_size > 0
