"""`openkd generate` as one run: the summary is printed once however the run ends, and the
teacher backend gets the settings the user chose (`TeacherSpec`), whoever builds it."""

from __future__ import annotations

from openkd.generate.backends.spec import TeacherSpec, teacher_spec
from openkd.generate.config import GenerateConfig
from tests.generate_helpers import generate
from tests.helpers import error_line

TITLE = "openkd generate: "


def test_the_summary_is_printed_once_however_the_run_ends(prompts_file, tmp_path, monkeypatch):
    out, few = tmp_path / "t.jsonl", ("--max-samples", "5")
    done = generate(prompts_file, out, *few)
    replayed = generate(prompts_file, out, *few)  # a finished run, answered from the index
    assert (done.code, replayed.code) == (0, 0), done.stderr + replayed.stderr
    assert "nothing to label" in replayed.stderr
    failed = generate(prompts_file, tmp_path / "f.jsonl", *few, "--mock-fail", "[aeiou]")
    assert failed.code != 0 and "prompts failed" in error_line(failed.stderr)

    import openkd.generate.run as run_module

    def dies(*_args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "label", dies)
    stopped = generate(prompts_file, tmp_path / "s.jsonl", *few)
    assert "interrupted" in error_line(stopped.stderr)
    for proc in (done, replayed, failed, stopped):
        assert proc.stderr.count(TITLE) == 1, proc.stderr
    assert not (tmp_path / "s.jsonl").exists()  # stopped before any answer: nothing is left


def test_the_teacher_gets_what_was_chosen_and_generates_defaults_otherwise(tmp_path):
    for name, field in TeacherSpec.model_fields.items():
        if name in GenerateConfig.model_fields and not field.is_required():
            ours = GenerateConfig.model_fields[name].get_default(call_default_factory=True)
            assert field.get_default(call_default_factory=True) == ours, name
    cfg = GenerateConfig(
        teacher="t",
        dataset="d.jsonl",
        backend="mock",
        mock_rule="sum",
        concurrency=7,
        logprobs=3,
        output=tmp_path / "labels.jsonl",
        shard="1/4",
    )
    spec = teacher_spec(cfg)
    assert (spec.backend, spec.mock_rule, spec.concurrency, spec.logprobs) == ("mock", "sum", 7, 3)
    assert spec.server_log == tmp_path / "labels.shard-1-of-4.server.log"
    assert "api_key_env" not in spec.model_fields_set  # distilabel keeps its own variable
