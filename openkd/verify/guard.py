"""Refuse parsed answers that sympy would take minutes or gigabytes to evaluate.

math-verify evaluates what it parsed (`doit`, numeric comparison). For `9^{9^{9^{9}}}` sympy
computes an integer with hundreds of millions of digits in a single C call, which no timeout
can interrupt (`openkd.verify.deadline`). Such answers are rejected before verification, from
an estimate of their size that never evaluates anything large.
"""

from __future__ import annotations

import math
from typing import Any

# Measured on one CPU core: an integer power with 10^6 digits takes milliseconds, 9^(9^9)
# (3.7 * 10^8 digits) seconds, anything larger minutes to forever; binomial(10^5, 5 * 10^4)
# takes 1.4 s. Slow Python-level work (expanding (x + 1)^1000 takes 20 s) is left to the
# deadline, which can stop it.
MAX_DIGITS = 10_000_000
MAX_FACTORIAL = 100_000


def too_large(expr: Any) -> str | None:
    """Why evaluating `expr` (a sympy object, or anything else) is unsafe, or None if it is fine."""
    from sympy import Basic, Pow
    from sympy.functions.combinatorial.factorials import binomial, factorial, factorial2
    from sympy.functions.special.gamma_functions import gamma

    if not isinstance(expr, Basic):
        return None
    for node in _walk(expr):
        if isinstance(node, Pow) and not node.free_symbols:
            digits = _log10(node)
            if digits > MAX_DIGITS:
                return f"a number with {_digits(digits)} digits"
        elif isinstance(node, (factorial, factorial2, gamma, binomial)) and _huge_argument(node):
            return f"a factorial of a number over {MAX_FACTORIAL:,}"
    return None


def _huge_argument(node: Any) -> bool:
    first = node.args[0]
    return not first.free_symbols and _log10(first) > math.log10(MAX_FACTORIAL)


def _walk(expr: Any):
    stack = [expr]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(getattr(node, "args", ()))


def _digits(log10: float) -> str:
    return "more than 10^300" if math.isinf(log10) else f"~10^{int(math.log10(log10))}"


def _log10(expr: Any) -> float:
    """log10 of |expr| for a numeric sympy expression, estimated without evaluating it; +inf for
    astronomically large values, 0 for what it cannot estimate (small or unknown)."""
    from sympy import Add, Float, Integer, Mul, Pow, Rational

    try:
        if isinstance(expr, Integer):
            return math.log10(abs(int(expr))) if expr != 0 else 0.0
        if isinstance(expr, Rational):
            return max(_log10(Integer(expr.p)) - _log10(Integer(expr.q)), 0.0)
        if isinstance(expr, Float):
            value = abs(float(expr))
            return math.log10(value) if value > 1 else 0.0
        if isinstance(expr, Pow):
            base, exponent = (_log10(a) for a in expr.args)
            if exponent > 300:
                return math.inf if base > 0 else 0.0
            return base * 10**exponent
        if isinstance(expr, Mul):
            return sum(_log10(a) for a in expr.args)
        if isinstance(expr, Add):
            return max((_log10(a) for a in expr.args), default=0.0) + math.log10(len(expr.args))
        return max((_log10(a) for a in getattr(expr, "args", ())), default=0.0)
    except (OverflowError, ValueError, TypeError):
        return math.inf
