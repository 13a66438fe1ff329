"""`openkd eval`: score a distilled student against its teacher on held-out prompts.

Modules: `config` (EvalConfig), `examples` (reading the held-out set), `metrics` (pure
agreement metrics, pass@k), `nll` (teacher-forced likelihood), `report` (aggregation and
files), `run` (the command). Benchmark mode (gold answers, no teacher): `tasks` (resolving
`--benchmark`), `benchmark` (answering and grading), `scores` (its report and table).
"""
