"""`openkd plan`: the law, its fit on pilots, costs, and the commands on synthetic pilot runs.

Pilots here are generated from the distillation law with known coefficients (tests/
plan_helpers.py), laid out as openkd train and openkd eval write them, so fitting can be
checked against the truth in seconds. The real sweep on tiny students is test_plan_pilot.py.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from openkd.plan import prior
from openkd.plan.costs import candidate_costs, gpu_hours, read_meta, sidecar_bytes
from openkd.plan.fit import Point, Unidentifiable, fit_distillation, fit_supervised
from openkd.plan.law import (
    Distillation,
    Law,
    Supervised,
    student_loss,
    supervised_loss,
    teacher_slope,
)
from openkd.plan.params import non_embedding_params
from openkd.plan.png import Canvas, read_png_size
from tests.helpers import error_line, invoke
from tests.plan_helpers import TOKENS_PER_EPOCH, TRUTH, llama_params, write_grid, write_pilot


def grid_points(law: Law, teachers=(0.3,), noise: float = 0.0, seed: int = 0) -> list[Point]:
    rng = np.random.default_rng(seed)
    points = []
    for lt in teachers:
        for n in (1e5, 3e5, 1e6):
            for d in (1e6, 4e6, 1.6e7):
                loss = float(student_loss(law, n, d, lt)) * (1 + noise * rng.standard_normal())
                points.append(Point(f"{n:g}/{d:g}/{lt}", n, d, loss, lt))
    return points


# --- the law ------------------------------------------------------------------------------


def test_prior_reproduces_the_papers_equations_by_hand():
    """Table 6's coefficients in Equations 1 and 8, computed here independently."""
    n, d, lt = 1e9, 2e10, 2.3
    s = prior.SUPERVISED
    tilde = s.E + (s.A / n**s.alpha + s.B / d**s.beta) ** s.gamma
    q = prior.DISTILLATION
    gap = (1 + (lt / (tilde * q.d1)) ** (1 / q.f1)) ** (-q.c1 * q.f1)
    expected = lt + lt ** (-q.c0) * gap * (q.A / n**q.alpha + q.B / d**q.beta) ** q.gamma
    assert float(supervised_loss(s, n, d)) == pytest.approx(tilde, rel=1e-12)
    assert float(student_loss(prior.LAW, n, d, lt)) == pytest.approx(expected, rel=1e-12)
    assert 2.3 < expected < tilde  # above its teacher, below its SFT baseline
    assert (s.E, s.A, s.alpha, s.B, s.beta, s.gamma) == (
        1.220,
        3355.0,
        0.408,
        18186.0,
        0.431,
        0.452,
    )
    assert (q.A, q.alpha, q.B, q.beta, q.gamma) == (2243.0, 0.321, 24181.0, 0.637, 0.764)
    assert (q.c0, q.c1, q.f1, q.d1) == (2.549, 522.6, 0.090, 1.315)


def test_law_limits_and_capacity_gap():
    law = prior.LAW
    # An infinitely capable student copies any teacher.
    assert float(student_loss(law, 1e18, 1e22, 2.0)) == pytest.approx(2.0, abs=1e-3)
    # A teacher far worse than the student could learn to be: the student just copies it.
    assert float(student_loss(law, 3e9, 5e11, 4.0)) == pytest.approx(4.0, abs=1e-6)
    # The capacity gap: for a small student a very strong teacher is worse than a weaker one.
    slopes = teacher_slope(law, 1.5e8, 1e10, np.array([1.0, 1.4, 2.2, 3.0]))
    assert slopes[0] < 0 < slopes[-1]
    # Without a supervised law the break is off and no L_T means a deterministic teacher.
    plain = Law(Distillation(A=10.0, alpha=0.5, B=10.0, beta=0.5, gamma=1.0))
    assert float(student_loss(plain, 100.0, 100.0, 0.0)) == pytest.approx(2.0)


# --- fitting ------------------------------------------------------------------------------


def test_fit_recovers_known_coefficients_and_predicts_held_out_points():
    result = fit_distillation(grid_points(TRUTH), bootstrap=0)
    c = result.coefficients
    assert c["alpha"] == pytest.approx(0.35, rel=0.03)
    assert c["beta"] == pytest.approx(0.5, rel=0.03)
    assert c["gamma"] == pytest.approx(0.8, rel=0.03)
    assert c["c0"] == 0 and "one teacher" in result.fixed["c0"]
    fitted = Law(Distillation(**c))
    for n, d in ((2e5, 2e6), (5e5, 8e6), (8e5, 1.2e7)):
        assert float(student_loss(fitted, n, d, 0.3)) == pytest.approx(
            float(student_loss(TRUTH, n, d, 0.3)), rel=0.01
        )


def test_noisy_fit_predicts_within_a_few_percent_with_bootstrap_intervals():
    result = fit_distillation(grid_points(TRUTH, noise=0.01, seed=3), bootstrap=25, seed=1)
    fitted = Law(Distillation(**result.coefficients))
    for n, d in ((2e5, 2e6), (5e5, 8e6)):
        assert float(student_loss(fitted, n, d, 0.3)) == pytest.approx(
            float(student_loss(TRUTH, n, d, 0.3)), rel=0.03
        )
    spread = result.uncertainty()
    assert set(spread) == {"A", "alpha", "B", "beta", "gamma"}
    assert spread["alpha"]["low"] <= result.coefficients["alpha"] <= spread["alpha"]["high"]
    assert 18 <= len(result.samples) <= 25
    assert max(abs(r["relative_error"]) for r in result.residuals) < 0.05


def test_three_teachers_identify_c0():
    truth = Law(Distillation(A=300.0, alpha=0.35, B=2000.0, beta=0.5, gamma=0.8, c0=1.0))
    result = fit_distillation(grid_points(truth, teachers=(0.2, 0.4, 0.8)), bootstrap=0)
    assert "c0" in result.free
    assert result.coefficients["c0"] == pytest.approx(1.0, rel=0.05)
    assert result.coefficients["c1"] == 0 and "supervised" in result.fixed["c1"]


def test_supervised_fit_recovers_its_law():
    truth = Supervised(E=1.0, A=400.0, alpha=0.4, B=3000.0, beta=0.45, gamma=0.6)
    points = [
        Point(f"{n:g}/{d:g}", n, d, float(supervised_loss(truth, n, d)))
        for n in (1e5, 3e5, 1e6)
        for d in (1e6, 4e6, 1.6e7)
    ]
    fitted = Supervised(**fit_supervised(points, bootstrap=0).coefficients)
    assert float(supervised_loss(fitted, 5e5, 8e6)) == pytest.approx(
        float(supervised_loss(truth, 5e5, 8e6)), rel=0.01
    )


@pytest.mark.parametrize(
    "sizes,budgets,needed",
    [
        (
            (1e5, 3e5),
            (1e6, 4e6, 1.6e7),
            "2 student size(s) (N_S = 1e+05, 3e+05): add pilots at 1 more size(s)",
        ),
        (
            (1e5, 3e5, 1e6),
            (1e6,),
            "1 token budget(s) (D_S = 1e+06): add pilots with 2 more --max-steps value(s)",
        ),
    ],
)
def test_unidentifiable_pilots_are_refused_naming_what_to_add(sizes, budgets, needed):
    points = [
        Point("p", n, d, float(student_loss(TRUTH, n, d, 0.3)), 0.3) for n in sizes for d in budgets
    ]
    with pytest.raises(Unidentifiable) as err:
        fit_distillation(points, bootstrap=0)
    assert "the distillation pilots cannot identify the law" in str(err.value)
    assert needed in str(err.value)


def test_too_few_pilots_for_the_coefficients_is_refused():
    points = [Point("p", n, d, 2.0, 0.3) for n, d in ((1e5, 1e6), (3e5, 4e6), (1e6, 1.6e7))]
    with pytest.raises(
        Unidentifiable, match="3 pilot\\(s\\) for 5 coefficients: add at least 3 more"
    ):
        fit_distillation(points, bootstrap=0)


# --- costs --------------------------------------------------------------------------------


def test_costs_match_hand_computed_values(tmp_path: Path):
    # Student 100M non-embedding parameters on 2B answer tokens, teacher 7B, K=20 float16.
    costs = candidate_costs(1e8, 2e9, n_t=7e9, gpu_flops=4e14, logprobs=20)
    assert costs.student_flops == 1.2e18  # 6 * 1e8 * 2e9
    assert costs.teacher_tokens == 2e9
    assert costs.teacher_flops == 2.8e19  # 2 * 7e9 * 2e9
    assert costs.total_flops == 2.92e19
    assert costs.student_gpu_hours == pytest.approx(1.2e18 / 4e14 / 3600)  # 0.8333 h
    assert costs.labelling_gpu_hours == pytest.approx(2.8e19 / 4e14 / 3600)  # 19.44 h
    assert costs.sidecar_bytes == 2e9 * (4 + 20 * (4 + 2))  # 248 GB
    assert sidecar_bytes(1000, 20, "float32") == 1000 * (4 + 20 * (4 + 4))
    assert gpu_hours(3.6e18, 1e15) == 1.0
    # Two epochs: half the tokens to label; prompts of 3 tokens per answer token cost 4x training.
    twice = candidate_costs(1e8, 2e9, n_t=7e9, gpu_flops=4e14, epochs=2, tokens_per_answer_token=4)
    assert twice.teacher_tokens == 1e9 and twice.teacher_flops == 1.4e19
    assert twice.student_flops == 4.8e18
    # Measured labelling: 1e4 answer tokens/s on 2 x 4 GPUs, 1 prompt token per answer token.
    meta = tmp_path / "labels.meta.json"
    meta.write_text(
        json.dumps(
            {
                "throughput": {"completion_tokens_per_second": 1e4},
                "config": {"tensor_parallel_size": 2, "data_parallel_size": 4},
                "counts": {"train": {"prompt_tokens": 900, "completion_tokens": 900},
                           "eval": {"prompt_tokens": 100, "completion_tokens": 100}},
            }
        )
    )  # fmt: skip
    labelling = read_meta(meta)
    assert (labelling.gpus, labelling.prompt_tokens_per_answer_token) == (8, 1.0)
    measured = candidate_costs(1e8, 2e9, n_t=7e9, gpu_flops=4e14, labelling=labelling)
    assert measured.labelling_gpu_hours == pytest.approx(2e9 / 1e4 * 8 / 3600)  # 444.4 h
    assert measured.teacher_flops == 2 * 7e9 * 2e9 * 2  # prompts read too


# --- model sizes --------------------------------------------------------------------------


@pytest.mark.slow  # imports torch and transformers: seconds
def test_non_embedding_params_from_config_match_the_weights():
    from transformers import GPT2Config, LlamaConfig, LlamaForCausalLM, Qwen2Config

    # make-tiny's default layout, instantiated to count its weights.
    model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA, vocab_size=2000))
    counted = sum(
        p.numel()
        for name, p in model.named_parameters()
        if "embed" not in name and "lm_head" not in name
    )
    assert non_embedding_params(model.config.to_dict()) == counted == llama_params(128)
    qwen = Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=100)  # fmt: skip
    # Qwen2 has q, k and v biases.
    h, q, k = 64, 64, 32
    assert (
        non_embedding_params(qwen.to_dict())
        == 2 * (h * q + 2 * h * k + q * h + q + 2 * k + 3 * h * 96 + 2 * h) + h
    )
    gpt2 = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100)
    assert non_embedding_params(gpt2.to_dict()) == 2 * (12 * 64 * 64 + 13 * 64) + 2 * 64


TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


def test_mixture_of_experts_is_refused():
    from openkd.errors import OpenkdError

    with pytest.raises(OpenkdError, match="mixture of experts"):
        non_embedding_params({**TINY_LLAMA, "model_type": "mixtral", "num_local_experts": 8})


# --- the PNG ------------------------------------------------------------------------------


def _decode(png: bytes) -> tuple[int, int, bytes]:
    width, height = read_png_size(png)
    pos, data = 8, b""
    while pos < len(png):
        (length,) = struct.unpack(">I", png[pos : pos + 4])
        kind = png[pos + 4 : pos + 8]
        body = png[pos + 8 : pos + 8 + length]
        assert struct.unpack(">I", png[pos + 8 + length : pos + 12 + length])[0] == zlib.crc32(
            kind + body
        )
        if kind == b"IDAT":
            data += body
        pos += 12 + length
    return width, height, zlib.decompress(data)


def test_canvas_writes_a_valid_png():
    canvas = Canvas(40, 20)
    canvas.line(0, 0, 39, 19, (255, 0, 0), width=2)
    canvas.text(2, 2, "L_S 1.5", (0, 0, 255))
    width, height, raw = _decode(canvas.png())
    assert (width, height) == (40, 20)
    assert len(raw) == height * (1 + 3 * width)
    assert canvas.get(20, 10) == (255, 0, 0) and canvas.get(39, 0) == (255, 255, 255)
    dashed = Canvas(60, 3)
    dashed.polyline([(float(x), 1.0) for x in range(0, 60, 2)], (0, 0, 0), dash=6)
    drawn = [dashed.get(x, 1) == (0, 0, 0) for x in range(60)]
    assert any(drawn) and not all(drawn)  # dashes across segments, not a solid line


# --- the commands, end to end -------------------------------------------------------------


def check_fit_json(data: dict) -> None:
    """The fit.json contract plan (and users' scripts) rely on."""
    assert data["format"] == "openkd.plan.fit/1"
    assert "Equation 8" in data["law"]["distillation"]
    dist = data["distillation"]
    assert set(dist["coefficients"]) == {"A", "alpha", "B", "beta", "gamma", "c0", "c1", "f1", "d1"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in dist["coefficients"].values())
    assert set(dist["free"]) | set(dist["fixed"]) == set(dist["coefficients"])
    for name, band in dist["uncertainty_90"].items():
        assert name in dist["free"] and band["low"] <= band["high"] and band["std"] >= 0
    assert all(len(row) == len(dist["free"]) for row in dist["bootstrap"]["samples"])
    for r in dist["residuals"]:
        assert set(r) >= {
            "pilot",
            "N_S",
            "D_S",
            "L_T",
            "observed",
            "predicted",
            "residual",
            "relative_error",
        }
    assert set(data["range"]) == {"N_S", "D_S", "L_T"}
    assert all(p["kind"] in ("distillation", "supervised") for p in data["pilots"])


def check_plan_json(data: dict) -> None:
    """The plan.json contract."""
    assert data["format"] == "openkd.plan/1"
    assert set(data) >= {
        "law",
        "coefficients",
        "teacher",
        "budget",
        "assumptions",
        "grid",
        "recommendation",
        "warnings",
        "plot",
    }
    for cell in data["grid"]:
        assert set(cell) == {
            "N_S",
            "D_S",
            "L_S",
            "L_S_interval_90",
            "L_supervised",
            "distillation_beats_sft",
            "costs",
            "within_budget",
            "extrapolation",
        }
        assert set(cell["costs"]) == {
            "teacher_tokens", "teacher_flops", "labelling_gpu_hours", "student_flops",
            "student_gpu_hours", "total_flops", "total_gpu_hours", "sidecar_bytes",
        }  # fmt: skip
        assert isinstance(cell["within_budget"], bool) and isinstance(cell["extrapolation"], dict)
    rec = data["recommendation"]
    if rec is not None:
        assert rec["within_budget"] and "capacity_gap" in rec


def test_fit_and_plan_end_to_end_on_pilot_runs(tmp_path: Path):
    pilots = write_grid(tmp_path / "pilots", noise=0.005)
    fit = tmp_path / "out" / "fit.json"
    proc = invoke(
        "plan", "fit", *pilots, "--teacher-loss", "0.3", "--bootstrap", "20", "--output", fit
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == str(fit)
    data = json.loads(fit.read_text())
    check_fit_json(data)
    assert data["range"]["N_S"] == [llama_params(64), llama_params(256)]
    assert data["range"]["D_S"] == [TOKENS_PER_EPOCH * 1.0, TOKENS_PER_EPOCH * 16.0]
    assert data["tokens_per_answer_token"] == pytest.approx(3.0)
    assert data["distillation"]["relative_error"]["max_abs"] < 0.03

    held_out_n, held_out_d = llama_params(192), TOKENS_PER_EPOCH * 8.0
    meta = tmp_path / "labels.meta.json"
    meta.write_text(
        json.dumps(
            {"throughput": {"completion_tokens_per_second": 5e4}, "config": {}, "counts": {}}
        )
    )
    plan = tmp_path / "plan"
    args = ["plan", "--fit", fit, "--teacher-loss", "0.3", "--teacher-params", "7e6",
            "--students", str(llama_params(64)), "--students", str(held_out_n), "--students", "1e8",
            "--tokens", "2M", "--tokens", str(held_out_d), "--budget-flops", "2e14",
            "--meta", meta, "--logprobs", "20", "--output-dir", plan]  # fmt: skip
    proc = invoke(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == str(plan / "plan.json")
    data = json.loads((plan / "plan.json").read_text())
    check_plan_json(data)
    cells = {(c["N_S"], c["D_S"]): c for c in data["grid"]}
    held = cells[(held_out_n, held_out_d)]
    truth = float(student_loss(TRUTH, held_out_n, held_out_d, 0.3))
    assert held["L_S"] == pytest.approx(truth, rel=0.03)
    low, high = held["L_S_interval_90"]
    assert low <= held["L_S"] <= high
    assert held["extrapolation"] == {}
    # 1e8 parameters is 100x past the largest pilot: flagged, and warned about.
    assert cells[(1e8, 2e6)]["extrapolation"]["N_S"] == pytest.approx(1e8 / llama_params(256))
    assert any("far outside the fitted range" in w for w in data["warnings"])
    assert "far outside the fitted range" in proc.stderr
    # Costs in the plan are the hand-computable ones (prompts: 3 tokens read per answer token).
    assert held["costs"]["student_flops"] == pytest.approx(6 * held_out_n * held_out_d * 3.0)
    assert held["costs"]["labelling_gpu_hours"] == pytest.approx(held_out_d / 5e4 / 3600)
    # The recommendation is the lowest predicted L_S within the budget.
    within = [c for c in data["grid"] if c["costs"]["total_flops"] <= 2e14]
    best = min(within, key=lambda c: c["L_S"])
    assert (data["recommendation"]["N_S"], data["recommendation"]["D_S"]) == (
        best["N_S"],
        best["D_S"],
    )
    assert data["recommendation"]["capacity_gap"] is None  # one teacher: c0 unidentified
    png = (plan / "plan.png").read_bytes()
    assert read_png_size(png) == (960, 600)


def test_plan_with_the_prior_needs_no_pilots(tmp_path: Path):
    proc = invoke(
        "plan", "--prior", "--teacher-loss", "2.3", "--students", "150M", "--students", "1B",
        "--tokens", "20B", "--tokens", "100B", "--teacher-params", "7.75e9",
        "--output-dir", tmp_path, "--no-plot",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "plan.json").read_text())
    check_plan_json(data)
    assert data["coefficients"]["source"].startswith("prior: Busbridge et al. 2025")
    cell = next(c for c in data["grid"] if c["N_S"] == 1e9 and c["D_S"] == 2e10)
    assert cell["L_S"] == pytest.approx(float(student_loss(prior.LAW, 1e9, 2e10, 2.3)))
    assert cell["L_supervised"] == pytest.approx(
        float(supervised_loss(prior.SUPERVISED, 1e9, 2e10))
    )
    assert cell["distillation_beats_sft"] is True
    assert data["recommendation"]["capacity_gap"]["past_sweet_spot"] is False
    assert not (tmp_path / "plan.png").exists()
    assert "outside that setting they are a shape" in proc.stderr


def test_plan_warns_when_the_teacher_is_past_the_students_sweet_spot(tmp_path: Path):
    """With the paper's coefficients, a 150M student distilled from a teacher of L_T 1.6 does
    better with a weaker one: the capacity gap."""
    args = ["plan", "--prior", "--students", "150M", "--tokens", "10B", "--no-plot"]
    proc = invoke(*args, "--teacher-loss", "1.6", "--output-dir", tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    gap = json.loads((tmp_path / "plan.json").read_text())["recommendation"]["capacity_gap"]
    assert gap["past_sweet_spot"] is True and gap["dL_S_dL_T"] < 0
    assert 1.6 < gap["best_teacher_loss"] < 2.3
    assert gap["L_S_with_best_teacher"] < float(student_loss(prior.LAW, 1.5e8, 1e10, 1.6))
    assert "capacity gap: the teacher (L_T 1.6) is past this student's sweet spot" in proc.stderr
    proc = invoke(*args, "--teacher-loss", "0", "--output-dir", tmp_path / "zero")
    assert "so L_T must be > 0" in error_line(proc.stderr)


def test_fit_refuses_unidentifiable_pilots_in_one_line(tmp_path: Path):
    pilots = write_grid(tmp_path / "pilots", hidden=(64, 128))
    proc = invoke(
        "plan", "fit", *pilots, "--teacher-loss", "0.3", "--output", tmp_path / "fit.json"
    )
    assert proc.returncode == 1
    line = error_line(proc.stderr)
    assert (
        "cannot identify the law: 2 student size(s)" in line
        and "add pilots at 1 more size(s)" in line
    )
    assert not (tmp_path / "fit.json").exists()


@pytest.mark.parametrize(
    "setup,args,message",
    [
        (
            "no-nll",
            [],
            "eval measured no NLL of the teacher's answers for the student; rerun openkd eval with --nll",
        ),
        ("diverged", [], "training status is 'diverged', not 'complete'"),
        ("missing", [], "does not exist; pass an openkd eval report or its directory"),
        ("no-teacher-loss", [], "has no teacher cross-entropy L_T; pass --teacher-loss VALUE"),
        (
            "ok",
            ["--teacher-loss", "other=0.3"],
            "no pilot has teacher 'other' (the pilots' teachers: tiny-teacher)",
        ),
        ("ok", ["--teacher-loss", "0.3", "--fix", "zeta=1"], "'zeta' is not a coefficient"),
        (
            "ok",
            ["--teacher-loss", "0.3", "--teacher-model", "x"],
            "--teacher-loss and --teacher-model: pass one",
        ),
    ],
)
def test_fit_input_errors_are_one_line(tmp_path: Path, setup, args, message):
    pilots = write_grid(tmp_path / "pilots")
    if setup == "no-nll":
        pilots.append(
            write_pilot(tmp_path / "pilots", "bad", hidden=64, epochs=2.0, loss=1.0, nll=False)
        )
    elif setup == "diverged":
        pilots.append(
            write_pilot(
                tmp_path / "pilots", "bad", hidden=64, epochs=2.0, loss=1.0, status="diverged"
            )
        )
    elif setup == "missing":
        pilots.append(tmp_path / "nowhere")
    extra = ["--teacher-loss", "0.3"] if setup in ("no-nll", "diverged", "missing") else []
    proc = invoke("plan", "fit", *pilots, *extra, *args, "--output", tmp_path / "fit.json")
    assert proc.returncode != 0
    assert message in error_line(proc.stderr)


def test_plan_refuses_bad_flags_and_foreign_outputs(tmp_path: Path):
    proc = invoke(
        "plan",
        "--fit",
        "f.json",
        "--prior",
        "--teacher-loss",
        "1",
        "--students",
        "1M",
        "--tokens",
        "1M",
    )
    assert proc.returncode == 2
    assert "pass --fit FILE (from openkd plan fit) or --prior" in error_line(proc.stderr)
    proc = invoke("plan", "--prior", "--students", "1M", "--tokens", "lots")
    line = error_line(proc.stderr)
    assert "--teacher-loss is required" in line and "--tokens lots: expected a count" in line
    (tmp_path / "plan.json").write_text('{"mine": true}')
    proc = invoke(
        "plan",
        "--prior",
        "--teacher-loss",
        "2.3",
        "--students",
        "1B",
        "--tokens",
        "20B",
        "--output-dir",
        tmp_path,
    )
    assert proc.returncode == 1
    assert "exists and openkd plan did not write it" in error_line(proc.stderr)
    assert (tmp_path / "plan.json").read_text() == '{"mine": true}'


def test_pilots_from_a_jsonl_file_and_supervised_pilots(tmp_path: Path):
    """Runs from elsewhere, with supervised ones: the SFT baseline appears in the plan."""
    sup = Supervised(E=1.0, A=400.0, alpha=0.4, B=3000.0, beta=0.45, gamma=0.6)
    rows = []
    for n in (1e5, 3e5, 1e6):
        for d in (1e6, 4e6, 1.6e7):
            rows.append(
                {
                    "name": f"d{n:g}-{d:g}",
                    "N_S": n,
                    "D_S": d,
                    "L_S": float(student_loss(TRUTH, n, d, 0.3)),
                    "L_T": 0.3,
                }
            )
            rows.append(
                {
                    "name": f"s{n:g}-{d:g}",
                    "N_S": n,
                    "D_S": d,
                    "L_S": float(supervised_loss(sup, n, d)),
                    "kind": "supervised",
                }
            )
    runs = tmp_path / "runs.jsonl"
    runs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fit = tmp_path / "fit.json"
    proc = invoke("plan", "fit", runs, "--bootstrap", "0", "--output", fit)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(fit.read_text())
    check_fit_json(data)
    assert data["supervised"]["coefficients"]["E"] == pytest.approx(1.0, rel=0.05)
    proc = invoke(
        "plan",
        "--fit",
        fit,
        "--teacher-loss",
        "0.3",
        "--students",
        "5e5",
        "--tokens",
        "8e6",
        "--output-dir",
        tmp_path / "plan",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    cell = json.loads((tmp_path / "plan" / "plan.json").read_text())["grid"][0]
    assert cell["L_supervised"] == pytest.approx(float(supervised_loss(sup, 5e5, 8e6)), rel=0.01)
    assert cell["distillation_beats_sft"] == (cell["L_S"] < cell["L_supervised"])
