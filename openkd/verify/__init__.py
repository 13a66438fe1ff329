"""Verify a model's final answer against a gold answer: one home for every caller.

    from openkd.verify import make_verifier
    check = make_verifier("math")                 # or make_verifier("exact", r"Answer: (\\w+)")
    verdict = check(answer_text, gold)            # Verdict(correct, answer, gold, method, reason)

`openkd eval` scores final-answer accuracy with it; a verifier is a pure function of
(answer text, gold), cheap enough to call per row and safe in worker threads.
"""

from openkd.verify.verdict import Verdict
from openkd.verify.verifier import KINDS, Verifier, VerifyKind, make_verifier

__all__ = ["KINDS", "Verdict", "Verifier", "VerifyKind", "make_verifier"]
