"""`openkd plan`: predict a distilled student's cross-entropy before training it.

The distillation scaling law of Busbridge et al. 2025 ("Distillation Scaling Laws", arXiv
2502.08606v2, Equation 8) as pure functions (`law`), its published coefficients as a labelled
prior (`prior`), fitted on pilot runs of the user's own setting (`pilots`, `params`, `fit`),
then used to predict and cost a grid of student sizes and token budgets (`costs`, `predict`),
shown as a table, a PNG and JSON (`report`, `plot`, `png`). `sweep` runs the pilots.
"""
