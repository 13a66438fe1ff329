"""`openkd plan fit` and `openkd plan` (predict): read, fit or predict, write, summarise."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np

from openkd import console
from openkd.errors import OpenkdError
from openkd.paths import refuse_input_as_output
from openkd.plan import prior, report
from openkd.plan.config import FitConfig, PlanConfig, parse_count, parse_fix
from openkd.plan.costs import Labelling, candidate_costs, read_meta
from openkd.plan.fit import distinct, fit_distillation, fit_supervised
from openkd.plan.law import DISTILLATION_FORM, SUPERVISED_FORM, Supervised
from openkd.plan.params import model_params
from openkd.plan.pilots import read_pilots, with_teacher_losses
from openkd.plan.predict import (
    FAR,
    Cell,
    Coefficients,
    capacity_gap,
    extrapolation,
    from_prior,
    load_fit,
    predict_cell,
)

PLAN_JSON, PLAN_PNG = "plan.json", "plan.png"
LAW = {
    "paper": "Busbridge et al. 2025, Distillation Scaling Laws, arXiv 2502.08606v2",
    "distillation": f"Equation 8: {DISTILLATION_FORM}",
    "supervised": f"Equation 1: {SUPERVISED_FORM}",
    "units": {
        "N_S": "non-embedding parameters",
        "D_S": "answer tokens the student trains on (repeats over epochs included)",
        "L": "nats per answer token on held-out teacher answers (openkd eval's NLL)",
    },
}


def _span(values: list[float]) -> list[float] | None:
    return [min(values), max(values)] if values else None


# --- fit ----------------------------------------------------------------------------------


def run_fit(cfg: FitConfig) -> None:
    inputs: dict[str, str | Path | None] = {f"PILOT {p}": p for p in cfg.pilots}
    inputs.update({f"--supervised {p}": p for p in cfg.supervised})
    inputs["--teacher-model"] = cfg.teacher_model
    refuse_input_as_output(cfg.output, inputs, output_flag="--output")
    report.check_replaceable(cfg.output, report.FIT_FORMAT, "--output")
    given = read_pilots(cfg.pilots)
    supervised_pilots = [p for p in given if p.kind == "supervised"]
    if cfg.supervised:
        supervised_pilots += read_pilots(cfg.supervised, kind="supervised")
    pilots = [p for p in given if p.kind == "distillation"]
    if not pilots:
        raise OpenkdError(
            "no distillation pilots among the pilots given; pass at least the distilled "
            "students' eval reports"
        )
    pilots = with_teacher_losses(pilots, cfg.teacher_loss)
    if cfg.teacher_model:
        from openkd.plan.teacher import measure_pilots

        pilots = measure_pilots(pilots, cfg.teacher_model)
    fixed = parse_fix(cfg.fix)
    sup_result = None
    supervised: Supervised | None = None
    if supervised_pilots:
        sup_result = fit_supervised(
            [p.point() for p in supervised_pilots], bootstrap=cfg.bootstrap, seed=cfg.seed
        )
        supervised = Supervised(**sup_result.coefficients)
    result = fit_distillation(
        [p.point() for p in pilots], supervised, fixed=fixed, bootstrap=cfg.bootstrap, seed=cfg.seed
    )
    if sup_result is not None:
        report.fit_table("supervised", sup_result)
    report.fit_table("distillation", result)
    ratios = [p.tokens_per_answer_token for p in pilots if p.tokens_per_answer_token]
    teachers = [p.lt for p in pilots if p.lt is not None]
    data = {
        **report.header(report.FIT_FORMAT),
        "law": LAW,
        "method": {
            "loss": "Huber (delta 1e-4) of log predicted - log observed, as the paper's Appendix F",
            "optimizer": "scipy least_squares (trust region) from the best of random starts",
            "bootstrap": {
                "resamples": cfg.bootstrap,
                "seed": cfg.seed,
                "interval": "5th-95th percentile",
            },
        },
        "distillation": result.to_json(),
        "supervised": sup_result.to_json() if sup_result else None,
        "range": {
            "N_S": _span([p.n for p in pilots]),
            "D_S": _span([p.d for p in pilots]),
            "L_T": _span(teachers),
        },
        "teachers": distinct(teachers),
        "tokens_per_answer_token": float(np.mean(ratios)) if ratios else None,
        "pilots": [p.to_json() for p in pilots + supervised_pilots],
    }
    report.write_atomic(cfg.output, report.dump(data))
    console.info(f"fit written to {cfg.output}")
    console.stdout_line(str(cfg.output))


# --- predict -------------------------------------------------------------------------------


def _students(values: list[str]) -> list[float]:
    out = []
    for value in values:
        count = parse_count(value)
        if count is None:
            path = Path(value).expanduser()
            if not (path / "config.json").is_file():
                raise OpenkdError(
                    f"--students {value}: not a parameter count (150M, 1.5e9) nor a model "
                    "directory with a config.json"
                )
            count = float(model_params(path))
        out.append(count)
    return sorted(set(out))


def _teacher(cfg: PlanConfig) -> tuple[float, str, float | None]:
    """(L_T, where it came from, N_T or None)."""
    n_t = cfg.teacher_params
    if (
        n_t is None
        and cfg.teacher_model
        and (Path(cfg.teacher_model).expanduser() / "config.json").is_file()
    ):
        n_t = float(model_params(Path(cfg.teacher_model).expanduser()))
    if cfg.teacher_loss is not None:
        return cfg.teacher_loss, "--teacher-loss", n_t
    from openkd.plan.teacher import read_pairs, teacher_loss

    assert cfg.teacher_model and cfg.held_out
    pairs = read_pairs(cfg.held_out)
    console.info(f"measuring L_T: {cfg.teacher_model} on {len(pairs):,} held-out answers")
    return (
        teacher_loss(cfg.teacher_model, pairs),
        f"measured: {cfg.teacher_model} on {cfg.held_out}",
        n_t,
    )


def _recommend(cells: list[Cell]) -> Cell | None:
    usable = [c for c in cells if c.within_budget and math.isfinite(c.loss)]
    return min(usable, key=lambda c: (c.loss, c.costs.total_flops)) if usable else None


def run_predict(cfg: PlanConfig) -> None:
    out_dir = Path(cfg.output_dir)
    refuse_input_as_output(
        out_dir,
        {
            "--fit": cfg.fit,
            "--held-out": cfg.held_out,
            "--meta": cfg.meta,
            "--teacher-model": cfg.teacher_model,
        },
        output_flag="--output-dir",
        written=lambda rel: rel.parts[0] in (PLAN_JSON, PLAN_PNG),
    )
    report.check_replaceable(out_dir / PLAN_JSON, report.PLAN_FORMAT, "--output-dir")
    coef: Coefficients = load_fit(cfg.fit) if cfg.fit else from_prior()
    sizes = _students(cfg.students)
    budgets = sorted({float(parse_count(t) or 0) for t in cfg.tokens})
    labelling: Labelling | None = read_meta(cfg.meta) if cfg.meta else None
    lt, lt_source, n_t = _teacher(cfg)
    ratio = cfg.tokens_per_answer_token or coef.tokens_per_answer_token or 1.0
    warnings: list[str] = []
    if cfg.prior:
        warnings.append(
            f"coefficients are the paper's ({prior.SETTING}); outside that setting they are a shape, not a prediction"
        )
    if lt <= 0 and coef.law.distillation.c0 > 0:
        raise OpenkdError(
            f"--teacher-loss {lt:g}: these coefficients have c0 = {coef.law.distillation.c0:g}, "
            "so L_T must be > 0 (a teacher with no uncertainty is outside their range)"
        )
    if n_t is None and labelling is None:
        warnings.append(
            "labelling not costed: pass --teacher-params, --teacher-model DIR or --meta"
        )
    cells = []
    for n in sizes:
        for d in budgets:
            loss, low, high, sup = predict_cell(coef, n, d, lt)
            costs = candidate_costs(
                n, d, n_t=n_t, gpu_flops=cfg.gpu_flops, epochs=cfg.epochs,
                tokens_per_answer_token=ratio, labelling=labelling,
                logprobs=cfg.logprobs, logprobs_dtype=cfg.logprobs_dtype,
            )  # fmt: skip
            within = True
            if cfg.budget_flops is not None:
                within = costs.total_flops <= cfg.budget_flops
            elif cfg.budget_gpu_hours is not None:
                within = costs.total_gpu_hours <= cfg.budget_gpu_hours
            cells.append(
                Cell(n, d, loss, low, high, sup, costs, within, extrapolation(coef, n, d, lt))
            )
    far = [c for c in cells if any(f > FAR for f in c.extrapolation.values())]
    if far:
        axes = sorted({a for c in far for a, f in c.extrapolation.items() if f > FAR})
        worst = max(f for c in far for f in c.extrapolation.values())
        warnings.append(
            f"{len(far)} of {len(cells)} candidates lie far outside the fitted range ({', '.join(axes)}; up to "
            f"{worst:.3g}x): those predictions extrapolate the fit"
        )
    best = _recommend(cells)
    recommendation: dict[str, Any] | None = None
    if best is None:
        cheapest = min(cells, key=lambda c: c.costs.total_flops)
        warnings.append(
            f"no candidate fits the budget; the cheapest ({cheapest.n:.3g} parameters, {cheapest.d:.3g} "
            f"tokens) costs {cheapest.costs.total_flops:.3g} FLOPs / {cheapest.costs.total_gpu_hours:.3g} GPU-h"
        )
    else:
        recommendation = {**best.to_json(), "capacity_gap": capacity_gap(coef, best.n, best.d, lt)}
        gap = recommendation["capacity_gap"]
        if gap and gap["past_sweet_spot"]:
            warnings.append(
                f"capacity gap: the teacher (L_T {lt:.3g}) is past this student's sweet spot; a "
                f"teacher of L_T {gap['best_teacher_loss']:.3g} is predicted to give L_S "
                f"{gap['L_S_with_best_teacher']:.4g} instead of {best.loss:.4g}"
            )
    report.grid_table(cells, sizes, budgets, best)
    console.summary_table("openkd plan: recommendation", report.recommendation_rows(recommendation))
    for line in warnings:
        console.warn(line)
    plot_path = None
    if cfg.plot:
        from openkd.plan.plot import draw

        plot_path = out_dir / PLAN_PNG
        report.write_atomic(plot_path, draw(coef, lt, sizes, budgets, cells, best))
    data = {
        **report.header(report.PLAN_FORMAT),
        "law": LAW,
        "coefficients": {
            "source": coef.source,
            "distillation": coef.law.distillation.to_dict(),
            "supervised": coef.law.supervised.to_dict() if coef.law.supervised else None,
            "fixed": coef.fixed,
            "range": coef.range,
            "bootstrap_samples": len(coef.samples),
        },
        "teacher": {
            "L_T": lt,
            "L_T_source": lt_source,
            "N_T": n_t,
            "labelling": None if labelling is None else dataclasses.asdict(labelling),
        },
        "budget": {
            "flops": cfg.budget_flops,
            "gpu_hours": cfg.budget_gpu_hours,
            "gpu_flops": cfg.gpu_flops,
        },
        "assumptions": {
            "epochs": cfg.epochs,
            "tokens_per_answer_token": ratio,
            "logprobs": cfg.logprobs,
            "logprobs_dtype": cfg.logprobs_dtype if cfg.logprobs else None,
        },
        "grid": [c.to_json() for c in cells],
        "recommendation": recommendation,
        "warnings": warnings,
        "plot": PLAN_PNG if plot_path else None,
    }
    report.write_atomic(out_dir / PLAN_JSON, report.dump(data))
    console.stdout_line(str(out_dir / PLAN_JSON))
