"""Stage 1: teacher labels. `run(cfg)` in `openkd.generate.run`; backends behind one interface."""
