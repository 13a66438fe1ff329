"""`openkd export` (axolotl-kd, distillkit, parquet) and `openkd train --logprobs SET`.

The labels are the mock teacher's (`openkd generate --backend mock --logprobs 4`) and one
hand-made row whose top-k at each position names the token it predicts. axolotl's and
DistillKit's loaders are not installed here (they pull CUDA stacks): the checks follow their
documented conventions (see openkd/export/axolotl.py and distillkit.py), and the DistillKit byte
layout is pinned by a hand-built position.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from openkd.data.logprobs import SidecarReader, SidecarWriter
from openkd.export import codec
from openkd.export.imports import import_sets
from tests.conftest import read_jsonl, write_jsonl
from tests.helpers import error_line, invoke

K = 4
FORMATS = ("parquet", "axolotl-kd", "distillkit")


@pytest.fixture(scope="module")
def labels(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 mock-teacher answers with their top-4 sidecar (and a held-out file beside them)."""
    from openkd.tiny import make_prompts

    root = tmp_path_factory.mktemp("labels")
    prompts = write_jsonl(root / "p.jsonl", [{"prompt": p} for p in make_prompts(30)])
    out = root / "t.jsonl"
    proc = invoke(
        "generate", "--backend", "mock", "--teacher", tiny_model, "--dataset", prompts,
        "--output", out, "--logprobs", str(K), "--eval-fraction", "0.2",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def hand_made(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One row whose top-k at answer position t is [token t, 1000 + t, 1100 + t, 1200 + t]."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    root = tmp_path_factory.mktemp("hand")
    answer = [*tokenizer("stone yellow harbor", add_special_tokens=False)["input_ids"], 2]
    top = np.array([[a, 1000 + t, 1100 + t, 1200 + t] for t, a in enumerate(answer)])
    logprobs = np.tile(np.array([-0.25, -2.5, -3.0, -4.0], dtype=np.float32), (len(answer), 1))
    row = {
        "id": "hand-1",
        "prompt": [{"role": "user", "content": "Reverse the words: harbor yellow stone"}],
        "completion": [{"role": "assistant", "content": "stone yellow harbor"}],
        "finish_reason": "stop",
    }
    data = write_jsonl(root / "h.jsonl", [row])
    (root / "h.meta.json").write_text(json.dumps({"teacher": {"name": str(tiny_model)}}))
    with SidecarWriter(root / "h.logprobs", K, meta={"teacher": str(tiny_model)}) as writer:
        writer.add("hand-1", answer, top, logprobs)
    prompt = tokenizer.apply_chat_template(
        row["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    full = tokenizer.apply_chat_template(
        row["prompt"] + row["completion"], tokenize=True, return_dict=True
    )["input_ids"]
    return {"data": data, "answer": answer, "top": top, "prompt": list(prompt), "full": full}


def export(source: Path, fmt: str, out: Path, *extra: str):
    return invoke("export", "--input", source, "--format", fmt, "--output", out, *extra)


def provenance(path: Path) -> dict:
    return json.loads(pq.ParquetFile(path).schema_arrow.metadata[b"openkd.export"])


def reimported(out: Path, tokenizer_dir: Path, cache: Path, monkeypatch) -> SidecarReader:
    from transformers import AutoTokenizer

    monkeypatch.setenv("OPENKD_CACHE", str(cache))
    dirs, _, warnings = import_sets([out], AutoTokenizer.from_pretrained(tokenizer_dir))
    assert warnings == []
    return SidecarReader(dirs)


# -- export -> import: the same top-k per position ------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_then_import_gives_back_the_same_top_k(
    fmt, labels, tiny_model, tmp_path, monkeypatch
):
    out = tmp_path / fmt
    proc = export(labels, fmt, out)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out)
    assert f"bytes/token ({fmt})" in proc.stderr and "bytes/token (sidecar, top-4)" in proc.stderr
    manifest = json.loads((out / ".openkd-export.json").read_text())
    rows = read_jsonl(labels)
    assert manifest["rows"] == len(rows) > 10 and manifest["skipped"] == {}
    assert manifest["bytes_per_token"] > 0 and (out / "README.md").is_file()
    meta = provenance(next(iter(sorted(out.glob("*.parquet")))))
    assert meta["teacher"] == str(tiny_model) and meta["k"] == K and meta["format"] == fmt

    # what axolotl does with a local directory (and DistillKit with a Hub or data_dir set)
    from datasets import load_dataset

    loaded = load_dataset(str(out), split="train", cache_dir=str(tmp_path / "hf"))
    assert loaded.num_rows == len(rows)

    original = SidecarReader(labels.with_name("t.logprobs"))
    back = reimported(out, tiny_model, tmp_path / "cache", monkeypatch)
    assert back.k == K and back.missing(r["id"] for r in rows) == []
    for row in rows:  # exact: parquet and axolotl store float32, distillkit's default float16
        want, got = original[row["id"]], back[row["id"]]
        assert np.array_equal(got.token_ids, want.token_ids)
        assert np.array_equal(got.top_ids, want.top_ids)
        assert np.array_equal(got.top_logprobs, want.top_logprobs)


def test_eval_file_exports_with_small_files(labels, tmp_path):
    out = tmp_path / "eval"
    proc = export(labels.with_name("t.eval.jsonl"), "parquet", out, "--rows-per-file", "2")
    assert proc.returncode == 0, proc.stderr
    held_out = [r["id"] for r in read_jsonl(labels.with_name("t.eval.jsonl"))]
    files = sorted(out.glob("data-*.parquet"))
    assert len(files) == (len(held_out) + 1) // 2 > 1  # 2 rows a file
    ids = [i for f in files for i in pq.read_table(f, columns=["id"]).column(0).to_pylist()]
    assert ids == held_out


# -- alignment: the hand-made row ---------------------------------------------------------------


def test_parquet_position_t_is_the_distribution_for_answer_token_t(hand_made, tmp_path):
    assert export(hand_made["data"], "parquet", tmp_path / "p").returncode == 0
    row = pq.read_table(tmp_path / "p" / "data-00000.parquet").to_pylist()[0]
    assert row["token_ids"] == hand_made["answer"]
    assert row["top_ids"] == hand_made["top"].tolist()
    assert row["top_logprobs"][0] == [-0.25, -2.5, -3.0, -4.0]


def test_axolotl_rows_land_where_its_loader_and_trainer_expect(hand_made, tmp_path):
    """axolotl right-aligns the rows with its tokenised conversation and pairs position j's row
    with the student's prediction of token j + 1."""
    assert export(hand_made["data"], "axolotl-kd", tmp_path / "a").returncode == 0
    row = pq.read_table(tmp_path / "a" / "data-00000.parquet").to_pylist()[0]
    assert set(row) == {"id", "messages", "target_token_ids", "target_logprobs"}
    full, prompt, answer = hand_made["full"], hand_made["prompt"], hand_made["answer"]
    assert full == prompt + answer  # this template ends the conversation at the end of turn
    rows, n, p = row["target_token_ids"], len(full), len(prompt)
    start = n - len(rows)  # the loader's front padding
    assert start == p - 1  # the first row predicts the answer's first token
    for t, token in enumerate(answer):
        assert full[p + t] == token
        assert rows[p + t - 1 - start] == hand_made["top"][t].tolist()
    assert rows[-1][0] == 2 and row["target_logprobs"][-1][0] == 0.0  # past the end: EOS stand-in
    assert row["target_logprobs"][0] == [-0.25, -2.5, -3.0, -4.0]
    snippet = (tmp_path / "a" / "README.md").read_text()
    assert "logprobs_field: target_logprobs" in snippet and "temperature: 1.0" in snippet


def test_distillkit_rows_and_labels_follow_its_convention(hand_made, tmp_path):
    """Row j predicts token j + 1; labels >= 0 exactly where a row holds the teacher's data."""
    assert export(hand_made["data"], "distillkit", tmp_path / "d").returncode == 0
    cfg = codec.CompressionConfig.model_validate(
        yaml.safe_load((tmp_path / "d" / "compression_config.yaml").read_text())
    )
    assert (cfg.d, cfg.k, cfg.exact_k, cfg.exact_dtype) == (2000, K, K, "float16")
    table = pq.ParquetFile(tmp_path / "d" / "data_0.parquet")
    assert table.schema_arrow.names == [
        "input_ids", "compressed_logprobs", "bytepacked_indices", "labels",
    ]  # fmt: skip
    assert json.loads(table.metadata.metadata[b"openkd.ids"]) == ["hand-1"]
    row = table.read().to_pylist()[0]
    prompt, answer = hand_made["prompt"], hand_made["answer"]
    p, t = len(prompt), len(answer)
    assert row["input_ids"] == prompt + answer
    assert len(row["compressed_logprobs"]) == len(row["input_ids"]) - 1
    ids, values = codec.decompress(
        cfg, np.array(row["compressed_logprobs"]), np.array(row["bytepacked_indices"])
    )
    assert ids[p - 1 : p - 1 + t].tolist() == hand_made["top"].tolist()
    assert np.allclose(values[p - 1], [-0.25, -2.5, -3.0, -4.0])
    assert [j for j, label in enumerate(row["labels"]) if label >= 0] == list(
        range(p - 1, p + t - 1)
    )
    assert all(ids[j, 0] == row["input_ids"][j + 1] for j in range(p - 1))  # prompt stand-ins


# -- DistillKit's byte layout and compression error ----------------------------------------------


def test_bit_packing_is_msb_first_and_ids_take_ceil_log2_d_bits():
    assert codec.pack_bits(np.array([[5, 3]]), 3).tolist() == [[0b10101100]]
    assert codec.unpack_bits(np.array([[0b10101100]], dtype=np.uint8), 3, 2).tolist() == [[5, 3]]
    assert codec.CompressionConfig(d=2000, k=4, exact_k=4).index_bits == 11
    assert codec.CompressionConfig(d=2048, k=4, exact_k=4).index_bits == 11
    assert codec.CompressionConfig(d=151936, k=4, exact_k=4).index_bits == 18


def test_a_hand_built_position_decodes_as_distillkit_lays_it_out():
    """exact_k=2 float16 values, then a 2-term polynomial (float32), then one 4-bit bin with a
    float16 scale; ids 11 bits each, MSB first."""
    cfg = codec.CompressionConfig(
        d=2000, k=4, exact_k=2, exact_dtype="float16", polynomial_terms=[0, 1],
        residual_bins=[{"scale_dtype": "float16", "element_bits": 4, "num_elements": 2}],
        delta_encoding=False,
    )  # fmt: skip
    exact = np.array([-0.5, -1.0], dtype="<f2").tobytes()
    coeffs = np.array([-2.0, -1.0], dtype="<f4").tobytes()  # tail: -2 - t at t = 0, 1
    scale = np.array([0.125], dtype="<f2").tobytes()
    levels = bytes([(9 << 4) | 6])  # 4-bit levels 9, 6 -> 1, -2 steps of 0.125
    raw = np.frombuffer(exact + coeffs + scale + levels, dtype=np.uint8)[None, :]
    assert raw.shape[1] == cfg.logprob_bytes == 2 * 2 + 2 * 4 + 2 + 1
    ids = codec.pack_bits(np.array([[7, 1999, 0, 1024]]), cfg.index_bits)
    got_ids, got = codec.decompress(cfg, raw, ids)
    assert got_ids.tolist() == [[7, 1999, 0, 1024]]
    assert got.tolist() == [[-0.5, -1.0, -2.0 + 0.125, -3.0 - 0.25]]


def test_lossy_settings_stay_within_the_quantisation_error():
    rng = np.random.default_rng(0)
    n, k = 200, 64
    logprobs = np.sort(-rng.gamma(1.5, 2.0, (n, k)), axis=1)[:, ::-1].astype(np.float32)
    ids = rng.integers(0, 32000, (n, k))
    cfg = codec.CompressionConfig(
        d=32000, k=k, exact_k=8, exact_dtype="float32", polynomial_terms=[0, 1, 2, "sqrt"],
        residual_bins=[{"scale_dtype": "float32", "element_bits": 6, "num_elements": k - 8}],
        delta_encoding=False,
    )  # fmt: skip
    packed, index = codec.compress(cfg, ids, logprobs)
    assert packed.shape[1] == cfg.logprob_bytes == 8 * 4 + 4 * 4 + 4 + (6 * 56 + 7) // 8
    got_ids, got = codec.decompress(cfg, packed, index)
    assert np.array_equal(got_ids, ids) and np.array_equal(got[:, :8], logprobs[:, :8])
    tail = logprobs[:, 8:].astype(np.float64)
    x = codec._design(cfg, k - 8).astype(np.float64)
    residual = tail - tail @ np.linalg.pinv(x).T @ x.T
    step = np.abs(residual).max(axis=1, keepdims=True) / 2**5  # 6 bits: levels -32..31
    error = np.abs(got[:, 8:] - tail)
    assert (error <= step + 1e-4).all()  # a full step only where +max clips at level 31
    assert np.median(error / step) < 0.3


def test_distillkit_export_with_a_lossy_config(labels, tmp_path, monkeypatch, tiny_model):
    config = tmp_path / "c.yaml"
    config.write_text(
        "d: 2000\nk: 4\nexact_k: 1\nexact_dtype: bfloat16\npolynomial_terms: [0, 1]\n"
        "residual_bins: [{scale_dtype: float16, element_bits: 4, num_elements: 3}]\n"
    )
    out = tmp_path / "d"
    proc = export(labels, "distillkit", out, "--distillkit-config", config)
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load((out / "compression_config.yaml").read_text())["exact_k"] == 1
    original = SidecarReader(labels.with_name("t.logprobs"))
    back = reimported(out, tiny_model, tmp_path / "cache", monkeypatch)
    worst = 0.0
    for row in read_jsonl(labels):
        want, got = original[row["id"]], back[row["id"]]
        assert np.array_equal(got.top_ids, want.top_ids)
        worst = max(worst, float(np.abs(got.top_logprobs - want.top_logprobs).max()))
    # the output is bfloat16 (half an ulp: 0.008 near -3) after 4-bit residuals (levels -8..7)
    # of a 2-term line through 3 values
    assert 0 < worst < 0.1


# -- refusals: one line, nothing written ----------------------------------------------------------


@pytest.mark.parametrize(
    "case,expected",
    [
        ("top_k", r"--top-k 5 is more than the sidecar holds \(top-4\); pass --top-k 4 or less"),
        ("config_k", r"has k=8, but the sidecar holds only the top-4; set k: 4 or less"),
        ("small_d", r"token id \d+ does not fit the DistillKit vocabulary d=100"),
        ("no_tokenizer", r"needs the tokenizer org/none but it could not be loaded .* --tokenizer"),
        ("not_ours", r"--output \S+ exists and is not an `openkd export` directory"),
        ("into_input", r"--output \S+ would overlap the input"),
        ("no_sidecar", r"has no teacher log-probabilities \(\S+/ is missing\)"),
    ],
)
def test_refusals_are_one_line_and_leave_nothing(case, expected, labels, tmp_path):
    import re

    out, fmt, extra = tmp_path / "out", "distillkit", []
    source = labels
    if case == "top_k":
        extra = ["--top-k", "5"]
    elif case in ("config_k", "small_d"):
        config = tmp_path / "c.yaml"
        d, k = (2000, 8) if case == "config_k" else (100, 4)
        config.write_text(f"d: {d}\nk: {k}\nexact_k: {k}\nexact_dtype: float16\n")
        extra = ["--distillkit-config", str(config)]
    elif case == "no_tokenizer":
        extra = ["--tokenizer", "org/none"]
    elif case == "not_ours":
        out.mkdir()
        (out / "mine.txt").write_text("keep")
    elif case == "into_input":
        out = labels.with_name("t.logprobs") / "export"
    elif case == "no_sidecar":
        source = write_jsonl(tmp_path / "bare.jsonl", read_jsonl(labels)[:2])
    proc = export(source, fmt, out, *extra)
    assert proc.returncode == 1, proc.stderr
    assert re.search(expected, error_line(proc.stderr)), proc.stderr
    if case == "not_ours":
        assert [p.name for p in out.iterdir()] == ["mine.txt"]
    else:
        assert not out.exists()
    assert not list(out.parent.glob(".out.openkd-tmp-*"))


def test_overwrite_replaces_only_an_earlier_export(labels, tmp_path):
    out = tmp_path / "out"
    assert export(labels, "parquet", out).returncode == 0
    again = export(labels, "parquet", out)
    assert again.returncode == 1 and "pass --overwrite to replace it" in error_line(again.stderr)
    assert export(labels, "axolotl-kd", out, "--overwrite").returncode == 0
    assert json.loads((out / ".openkd-export.json").read_text())["format"] == "axolotl-kd"
    assert sorted(p.name for p in out.iterdir()) == [
        ".openkd-export.json", "README.md", "data-00000.parquet",
    ]  # fmt: skip


def test_flag_mistakes_are_config_errors(labels, tmp_path):
    proc = export(labels, "parquet", tmp_path / "o", "--top-k", "0")
    assert proc.returncode == 2
    assert "--top-k: must be at least 1, got 0" in error_line(proc.stderr)
    proc = export(labels, "parquet", tmp_path / "o", "--tokenizer", "x")
    assert proc.returncode == 2
    assert "--tokenizer applies to --format axolotl-kd|distillkit" in error_line(proc.stderr)
    assert not (tmp_path / "o").exists()


def test_a_distillkit_set_without_its_config_is_refused_by_train_import(labels, tmp_path):
    out = tmp_path / "d"
    assert export(labels, "distillkit", out).returncode == 0
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "data_0.parquet").write_bytes((out / "data_0.parquet").read_bytes())
    from openkd.errors import OpenkdError

    with pytest.raises(OpenkdError, match=r"without compression_config\.yaml"):
        import_sets([copy], None)


# -- openkd train --logprobs SET ------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["axolotl-kd", "distillkit"])
def test_train_soft_from_an_exported_set(fmt, labels, tiny_model, tmp_path, monkeypatch):
    out = tmp_path / fmt
    assert export(labels, fmt, out).returncode == 0
    monkeypatch.setenv("OPENKD_CACHE", str(tmp_path / "cache"))
    code, stdout, err = invoke(
        "train", "--student", tiny_model, "--dataset", labels, "--logprobs", out,
        "--output-dir", tmp_path / "student", "--loss", "soft", "--max-steps", "2",
        "--batch-size", "4", "--save-steps", "2", "--eval-fraction", "0",
    )  # fmt: skip
    assert code == 0, err[-3000:]
    text, rows = " ".join(err.split()), len(read_jsonl(labels))
    assert f"{fmt} set {out}: {rows} rows read into the sidecar" in text
    assert f"the teacher's ids of the first {rows} rows are below the student's vocabulary" in text
    assert stdout.strip().splitlines()[-1] == str(tmp_path / "student")


def test_every_export_option_is_documented_and_a_yaml_section_works(labels, tmp_path):
    from openkd.export.config import ExportConfig

    proc = invoke("export", "--help", env={"COLUMNS": "200"})
    assert proc.returncode == 0
    for name, info in ExportConfig.model_fields.items():
        assert "--" + name.replace("_", "-") in proc.stdout and info.description
    config = tmp_path / "c.yaml"
    config.write_text(
        f"export:\n  input: {labels}\n  format: distillkit\n  output: o\n  top_k: 2\n"
    )
    proc = invoke("export", "--config", config, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout)["export"]["top_k"] == 2


def test_sets_without_openkd_ids_are_keyed_by_row_number(labels, tiny_model, tmp_path, monkeypatch):
    """A set another tool wrote: no `id` column (axolotl), no ids metadata and no `labels`
    (DistillKit: every row is data, the answer is every token after the first)."""
    rows = read_jsonl(labels)
    original = SidecarReader(labels.with_name("t.logprobs"))
    for fmt in ("axolotl-kd", "distillkit"):
        out = tmp_path / fmt
        assert export(labels, fmt, out).returncode == 0
        foreign = tmp_path / f"foreign-{fmt}"
        foreign.mkdir()
        for path in out.glob("*.parquet"):
            table = pq.read_table(path)
            table = table.drop_columns([c for c in ("id", "labels") if c in table.column_names])
            pq.write_table(table.replace_schema_metadata({}), foreign / path.name)
        for side in out.glob("*.yaml"):
            (foreign / side.name).write_text(side.read_text())
        back = reimported(foreign, tiny_model, tmp_path / "cache", monkeypatch)
        assert len(back) == len(rows)
        for number, row in enumerate(rows):
            want, got = original[row["id"]], back[str(number)]
            if fmt == "axolotl-kd":  # the answer and its rows, found by re-tokenising
                assert np.array_equal(got.token_ids, want.token_ids)
                assert np.array_equal(got.top_ids, want.top_ids)
            else:  # no labels: the prompt's stand-in rows come first, then the teacher's
                t = len(want.token_ids)
                assert np.array_equal(got.token_ids[-t:], want.token_ids)
                assert np.array_equal(got.top_ids[-t:], want.top_ids)
                assert (got.top_logprobs[:-t, 0] == 0).all()
