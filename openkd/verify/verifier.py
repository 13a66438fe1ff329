"""`make_verifier`: the one way callers get a verifier, built once and called per row."""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import partial
from typing import Literal

from openkd.errors import ConfigError
from openkd.verify.exact import verify_exact
from openkd.verify.maths import DEFAULT_TIMEOUT_S, verify_math
from openkd.verify.verdict import Verdict

VerifyKind = Literal["math", "exact"]
KINDS: tuple[str, ...] = ("math", "exact")
# verifier(answer_text, gold) -> Verdict; never raises for any answer text.
Verifier = Callable[[str, str], Verdict]


def make_verifier(
    kind: VerifyKind,
    answer_regex: str | None = None,
    *,
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
) -> Verifier:
    """A verifier for `kind`:

    - "math": math-verify equivalence (`\\frac{1}{2}` = `0.5`, `\\boxed{7}` = `7`); with
      `answer_regex`, the final answer is the regex's last match instead of what math-verify
      finds in the text. Bounded by `timeout_s` per call, in any thread.
    - "exact": the regex's last match (group 1 if any; default the last `\\boxed{...}`),
      compared with the gold answer after normalising case, surrounding punctuation and
      whitespace, and numerically when both are numbers.

    A bad `kind` or regex is a ConfigError naming the flag; the returned function is pure
    (no state between calls) and safe to call from several threads.
    """
    pattern = None
    if answer_regex is not None:
        try:
            pattern = re.compile(answer_regex)
        except re.error as exc:
            raise ConfigError(
                f"--answer-regex {answer_regex!r} is not a valid regex ({exc}); fix the pattern"
            ) from exc
    if kind == "math":
        return partial(verify_math, pattern=pattern, timeout_s=timeout_s)
    if kind == "exact":
        return partial(verify_exact, pattern=pattern)
    raise ConfigError(f"unknown verifier {kind!r}; use one of {', '.join(KINDS)}")
