"""Read pilot runs: what each student was, how much it trained, the cross-entropy it reached.

A pilot is an `openkd eval` report on a student `openkd train` wrote, given as the report, its
directory, or a directory holding `eval/report.json` (the layout `openkd plan pilot` writes):

- L_S: the report's student NLL of the teacher's held-out answers (nats per answer token);
- N_S: non-embedding parameters from the student's config.json (`params`);
- D_S: answer tokens trained on, `trained_tokens_per_epoch` (openkd_run.json) times the epochs
  trained (trainer_state.json), so a resumed run counts all of its steps;
- L_T: the teacher's own NLL of the same answers where the report has one, else given
  (--teacher-loss) or measured (--teacher-model).

Pilots from elsewhere come as a JSONL file, one object per run:
`{"name": ..., "N_S": ..., "D_S": ..., "L_S": ..., "L_T": ..., "kind": "distillation"}`
(`kind` `supervised` for a student trained on the data rather than a teacher's answers).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from openkd.errors import OpenkdError
from openkd.plan.fit import Point
from openkd.plan.params import model_params

REPORT = "report.json"
EXAMPLES = "examples.jsonl"
RUN_FILE = "openkd_run.json"
TRAINER_STATE = "trainer_state.json"
KINDS = ("distillation", "supervised")


@dataclass(frozen=True)
class Pilot:
    """One pilot run as the fit sees it, with where each number came from."""

    name: str
    kind: str
    n: float
    d: float
    loss: float
    lt: float | None = None
    teacher: str | None = None
    tokens_per_answer_token: float | None = None
    examples: Path | None = None
    student: str | None = None

    def point(self) -> Point:
        return Point(self.name, self.n, self.d, self.loss, self.lt)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "N_S": self.n,
            "D_S": self.d,
            "L_S": self.loss,
            "L_T": self.lt,
            "teacher": self.teacher,
            "tokens_per_answer_token": self.tokens_per_answer_token,
            "student": self.student,
        }


def _json(path: Path, what: str, fix: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise OpenkdError(f"{path} does not exist: {what}; {fix}") from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise OpenkdError(f"{path} is unreadable ({err}); {fix}") from err
    if not isinstance(data, dict):
        raise OpenkdError(f"{path} does not hold a JSON object; {fix}")
    return data


def find_report(spec: str) -> Path:
    """The eval report a pilot argument names."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    for candidate in (path / REPORT, path / "eval" / REPORT):
        if candidate.is_file():
            return candidate
    if not path.exists():
        raise OpenkdError(
            f"pilot {spec} does not exist; pass an openkd eval report or its directory"
        )
    raise OpenkdError(
        f"pilot {spec} holds no {REPORT} (nor eval/{REPORT}); run `openkd eval --student "
        f"STUDENT --output-dir {spec}` on the trained student first"
    )


def _student_dir(spec: str, report: Path) -> Path:
    """The trained student an eval report scored: as written, or relative to the report."""
    given = Path(spec).expanduser()
    tries = (
        [given]
        if given.is_absolute()
        else [given, report.parent / given, report.parent.parent / given]
    )
    for path in tries:
        if (path / "config.json").is_file():
            return path
    raise OpenkdError(
        f"{report}: its student {spec} is not found (tried {', '.join(map(str, tries))}); run "
        "openkd plan from the directory openkd eval ran in"
    )


def _run_dir(student: Path) -> Path:
    """Where openkd train's records are: the student itself, or above a merged LoRA model."""
    if (student / RUN_FILE).is_file():
        return student
    if (student.parent / RUN_FILE).is_file():
        return student.parent
    raise OpenkdError(
        f"{student} has no {RUN_FILE}: it was not trained by openkd train, so its training "
        "tokens are unknown; give this pilot in a JSONL pilots file instead"
    )


def trained_tokens(run_dir: Path) -> tuple[float, float | None]:
    """(answer tokens trained on, all tokens read per answer token) of a finished run."""
    fix = "pass a student openkd train finished"
    record = _json(run_dir / RUN_FILE, "the run record", fix)
    if record.get("status") != "complete":
        raise OpenkdError(
            f"{run_dir}: training status is {record.get('status')!r}, not 'complete'; finish it "
            "(rerun openkd train) or leave this pilot out"
        )
    results = record.get("results") or {}
    per_epoch = results.get("trained_tokens_per_epoch")
    state = _json(run_dir / TRAINER_STATE, "the trainer state", fix)
    epochs = state.get("epoch")
    if (
        not isinstance(per_epoch, int | float)
        or not isinstance(epochs, int | float)
        or per_epoch <= 0
        or epochs <= 0
    ):
        raise OpenkdError(
            f"{run_dir}: no answer-token count (trained_tokens_per_epoch in {RUN_FILE}, epoch in "
            f"{TRAINER_STATE}); give this pilot in a JSONL pilots file instead"
        )
    d = float(per_epoch) * float(epochs)
    seen = state.get("num_input_tokens_seen")
    ratio = float(seen) / d if isinstance(seen, int | float) and seen > 0 else None
    return d, ratio


def read_report_pilot(spec: str, kind: str = "distillation") -> Pilot:
    """A pilot from an eval report and the student it scored."""
    report_path = find_report(spec)
    fix = "pass a report.json openkd eval wrote"
    report = _json(report_path, "the eval report", fix)
    if not str(report.get("format", "")).startswith("openkd.eval/"):
        raise OpenkdError(f"{report_path} is not an openkd eval report; {fix}")
    models = report.get("models") or {}
    metrics = (models.get("student") or {}).get("metrics") or {}
    loss = metrics.get("nll")
    if not isinstance(loss, int | float) or not math.isfinite(loss):
        raise OpenkdError(
            f"{report_path}: eval measured no NLL of the teacher's answers for the student; "
            "rerun openkd eval with --nll"
        )
    config = report.get("config") or {}
    student = _student_dir(str(config.get("student")), report_path)
    d, ratio = trained_tokens(_run_dir(student))
    teacher = models.get("teacher") or {}
    lt = (teacher.get("metrics") or {}).get("nll")
    examples = report_path.parent / EXAMPLES
    return Pilot(
        name=spec,
        kind=kind,
        n=float(model_params(student)),
        d=d,
        loss=float(loss),
        lt=float(lt) if isinstance(lt, int | float) else None,
        teacher=str(teacher.get("name")) if teacher.get("name") else None,
        tokens_per_answer_token=ratio,
        examples=examples if examples.is_file() else None,
        student=str(student),
    )


def _number(row: dict[str, Any], key: str, where: str, required: bool = True) -> float | None:
    value = row.get(key)
    if value is None and not required:
        return None
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value < 0
    ):
        raise OpenkdError(f"{where}: {key} must be a finite number >= 0 (got {value!r})")
    return float(value)


def read_records(path: Path) -> list[Pilot]:
    """Pilots from a JSONL file of {name, N_S, D_S, L_S, L_T, kind} objects."""
    pilots = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise OpenkdError(f"pilots file {path} is unreadable ({err})") from err
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise OpenkdError(f"{where}: not a JSON object ({err.msg})") from err
        if not isinstance(row, dict):
            raise OpenkdError(f"{where}: not a JSON object")
        kind = row.get("kind", "distillation")
        if kind not in KINDS:
            raise OpenkdError(f"{where}: kind {kind!r} is not one of {', '.join(KINDS)}")
        n, d, loss = (_number(row, k, where) for k in ("N_S", "D_S", "L_S"))
        assert n is not None and d is not None and loss is not None
        if n <= 0 or d <= 0 or loss <= 0:
            raise OpenkdError(f"{where}: N_S, D_S and L_S must be > 0")
        pilots.append(
            Pilot(
                name=str(row.get("name") or where),
                kind=kind,
                n=n,
                d=d,
                loss=loss,
                lt=_number(row, "L_T", where, required=False),
                teacher=str(row["teacher"]) if row.get("teacher") else None,
            )
        )
    if not pilots:
        raise OpenkdError(f"pilots file {path} holds no pilots")
    return pilots


def read_pilots(specs: list[str], kind: str = "distillation") -> list[Pilot]:
    """Every pilot the arguments name, in order."""
    out: list[Pilot] = []
    for spec in specs:
        path = Path(spec).expanduser()
        if path.suffix == ".jsonl" and path.is_file():
            records = read_records(path)
            out += [p if kind == "distillation" else replace(p, kind=kind) for p in records]
        else:
            out.append(read_report_pilot(spec, kind))
    return out


def parse_teacher_losses(values: list[str]) -> tuple[float | None, dict[str, float]]:
    """`--teacher-loss` values: one number for every pilot, or TEACHER=NUMBER per teacher."""
    default: float | None = None
    named: dict[str, float] = {}
    for value in values:
        name, sep, number = value.rpartition("=")
        try:
            loss = float(number)
        except ValueError as err:
            raise OpenkdError(
                f"--teacher-loss {value}: expected a number of nats/token, or TEACHER=NUMBER"
            ) from err
        if not math.isfinite(loss) or loss < 0:
            raise OpenkdError(f"--teacher-loss {value}: must be a finite number >= 0")
        if sep:
            named[name] = loss
        else:
            default = loss
    return default, named


def with_teacher_losses(pilots: list[Pilot], values: list[str]) -> list[Pilot]:
    """Fill in L_T from --teacher-loss where the report had none (a given value wins)."""
    default, named = parse_teacher_losses(values)
    known = {p.teacher for p in pilots}
    unknown = [name for name in named if name not in known]
    if unknown:
        names = ", ".join(sorted(str(t) for t in known if t)) or "none"
        raise OpenkdError(
            f"--teacher-loss {unknown[0]}=...: no pilot has teacher {unknown[0]!r} (the pilots' "
            f"teachers: {names})"
        )
    out = []
    for p in pilots:
        lt = named.get(p.teacher or "", default)
        out.append(replace(p, lt=lt) if lt is not None else p)
    return out
