"""The maths of distillation, shared by `train` and `eval`: the KD loss over stored top-k
(`kd`), divergences between two models' heads (`divergence`), and the alignment of two
tokenizers' positions (`crosstok`). No I/O, no trainer."""
