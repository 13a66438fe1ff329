"""`openkd export`: a generate output's teacher labels and top-k in other trainers' formats.

One module per format (`parquet`, `axolotl`, `distillkit`, with DistillKit's compression in
`codec`), each writing from the common streaming reader `source` and reading its format back
for `openkd train --logprobs SET` (`imports` detects a set and converts it, once, into an
openkd sidecar in a cache, which training then reads like any other).
"""
