"""`openkd eval`: score a distilled student against its teacher on held-out prompts.

Modules: `config` (EvalConfig), `examples` (reading the held-out set), `metrics` (pure
agreement metrics), `nll` (teacher-forced likelihood), `report` (aggregation and files),
`run` (the command).
"""
