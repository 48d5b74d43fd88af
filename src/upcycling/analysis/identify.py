"""The identification rule of a fitted quantity (``identified``), shared by the diagnostics and
the intervals: not on a bound, an interval bounded on both sides, and no wider than a decade
(see :mod:`upcycling.analysis.diagnostics` and docs/fits.md)."""

from __future__ import annotations

import math

from upcycling.analysis.laws import ParamSpec

__all__ = ["DECADE", "identified"]

DECADE = 10.0


def identified(spec: ParamSpec | None, value: float, interval, bound: str | None) -> tuple[bool, str]:
    """Whether the runs identify the parameter (see the module docstring), and why not.

    ``spec`` None: a derived exponent-like quantity (alpha2 - alpha1, alpha1 in a token unit).
    An end at +-inf is a profile that stays within the 95% threshold up to a numerical limit.
    """
    if bound:
        return False, f"on a bound: {bound}"
    if interval is None or any(v is None or math.isnan(v) for v in interval):
        return False, "no interval (no profile, bootstrap samples or standard error)"
    low, high = (float(v) for v in interval)
    if math.isinf(low) or math.isinf(high):
        side = " and ".join(s for s, v in (("below", low), ("above", high)) if math.isinf(v))
        return False, f"interval unbounded {side} (the profile stays within the 95% threshold to a numerical limit)"
    if spec is not None and spec.is_log_amplitude:
        if low <= 0:
            return False, f"interval [{low:.3g}, {high:.3g}] reaches 0"
        if high / low > DECADE:
            return False, f"interval [{low:.3g}, {high:.3g}] spans {math.log10(high / low):.1f} decades"
        return True, ""
    if high - low > DECADE * abs(value):
        name = spec.natural if spec is not None else "estimate"
        return False, f"interval [{low:.3g}, {high:.3g}] is wider than ten times |{name}| = {abs(value):.3g}"
    return True, ""
