"""Cross-tokenizer soft labels: the teacher's stored top-K re-expressed on the student's tokens.

`vocab` gives every token of a tokenizer its bytes (byte-level `Ġ`, SentencePiece `▁` and
`<0x..>` byte fallback all read as the bytes they decode to) and maps teacher ids to student
ids by those bytes; `align` groups teacher and student tokens by the text they cover (GOLD's
walk over byte offsets); `targets` builds each student position's target (exact, merged or
ULD); `aligner` ties them to a row of the sidecar and measures coverage. Everything is computed
from the teacher's stored completion ids and top-K: nothing is re-run on the teacher.
"""
