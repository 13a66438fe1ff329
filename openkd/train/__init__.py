"""Stage 2: fine-tune a student on the teacher's answers. `run(cfg)` in `openkd.train.run`."""
