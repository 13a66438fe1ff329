"""`openkd train --loss on-policy`: the student samples answers, a teacher scores every token.

On TRL's `DistillationTrainer` (generalized JSD between the student's and the teacher's
next-token distributions on the student's own samples; `--kd-beta 1` is the reverse KL of
Thinking Machines' on-policy distillation). openkd adds its data and pre-flight checks, the
run identity and checkpoints of `openkd train`, GKD's mix with offline steps (`--kd-lambda`),
samples per prompt, the reverse-KL and time-share metrics, and the summary and card.

Modules: `data` (the prompts), `teacher` (loading the checked teacher, its run identity),
`arguments` (`DistillationConfig`), `trainer` (the trainer subclass), `setup` (building it, the
pre-flight, the summaries); for a teacher behind a vLLM server (`--teacher-base-url`,
`--teacher-serve`): `served` (the run's endpoint, the managed server) and `served_trainer` (on
TRL's experimental `ServerDistillationTrainer`); for a teacher with another vocabulary: `gold`
(on TRL's experimental `GOLDTrainer`, --cross-tokenizer). What eval shares (the tokenizer and
teacher checks, the server's pre-flight and scoring client) is in `openkd.teacher`; the exact
per-token reverse KL is `openkd.distill.divergence`.
"""
