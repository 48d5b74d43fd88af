"""What the report says of one fit's exponents, in the declared token unit (pure).

The fits (:mod:`upcycling.analysis.fitting`) keep raw-token parameters and add, for the
dataset and joint laws, the token unit (``token_unit``, ``tokens_per_unit``), alpha1 and alpha2
in it (``in_unit``), the unit-free quantities alpha3 and alpha2 - alpha1 (``invariants``) and the
two-step cross-check (``two_step``), each quantity ``{"value", "interval", "identified", "why"}``.
This module reads them (as fields of the fit or of its context) and, for fits written without
them, derives the same quantities from the raw parameters and the bootstrap samples: with D = u d,
alpha1 and alpha2 in the unit u are alpha1 - alpha3 ln u and alpha2 - alpha3 ln u.

- ``extra(fit, name, default)``: a block the fit helper adds, wherever the fit carries it
- ``token_unit(fits) -> str`` (default ``billions``), ``tokens_per_unit(name) -> float``
- ``unit_quantity(fit, "alpha1" | "alpha2")``, ``invariant(fit, "alpha3" | "alpha2_minus_alpha1")``
- ``alpha3_identified(fit) -> (bool, why)``: the only licence to state alpha3's sign
- ``irreducible_option(fit) -> str | None``: ``fit.irreducible`` (free | shared_dense)
- ``fmt``, ``interval_text``, ``quantity_text``: numbers for prose
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from upcycling.analysis.fitresult import FitResult
from upcycling.analysis.identify import identified
from upcycling.analysis.intervals import DEFAULT_TOKEN_UNIT, TOKEN_UNITS

__all__ = [
    "DEFAULT_TOKEN_UNIT",
    "alpha3_identified",
    "extra",
    "fmt",
    "interval_text",
    "invariant",
    "irreducible_option",
    "quantity_text",
    "token_unit",
    "tokens_per_unit",
    "unit_quantity",
]


def fmt(value: Any, digits: int = 3) -> str:
    """A number for prose: 3 significant digits, ∞ for infinity, n/a for missing."""
    if value is None:
        return "n/a"
    try:
        value = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(value):
        return "n/a"
    if math.isinf(value):
        return "∞" if value > 0 else "-∞"
    return f"{value:.{digits}g}"


def interval_text(pair) -> str:
    if not pair or len(pair) != 2:
        return "[n/a]"
    return f"[{fmt(pair[0])}, {fmt(pair[1])}]"


def quantity_text(entry: dict) -> str:
    return f"{fmt(entry.get('value'))} {interval_text(entry.get('interval'))}"


def extra(fit: FitResult, name: str, default: Any = None) -> Any:
    """The block ``name`` of the fit: a field of the result, else an entry of its context."""
    value = getattr(fit, name, None)
    if value in (None, {}, ""):
        value = fit.context.get(name)
    if value in (None, {}, "") and isinstance(fit.context.get("fit"), dict):
        value = fit.context["fit"].get(name)
    return default if value in (None, {}, "") else value


def tokens_per_unit(name: str) -> float:
    return TOKEN_UNITS.get(name, 1.0)


def token_unit(fits) -> str:
    """The token unit the fits declare (the first that does), else the default."""
    for fit in fits.values():
        if fit.ok and (unit := extra(fit, "token_unit")):
            return str(unit)
    return DEFAULT_TOKEN_UNIT


def _pair(interval) -> list[float]:
    if not interval or len(interval) != 2:
        return [math.nan, math.nan]
    return [math.nan if v is None else float(v) for v in interval]


def _normal(entry: dict) -> dict:
    return {
        "value": math.nan if entry.get("value") is None else float(entry["value"]),
        "interval": _pair(entry.get("interval")),
        "identified": bool(entry.get("identified", False)),
        "why": entry.get("why", ""),
    }


def _samples(fit: FitResult, *names: str) -> list[np.ndarray] | None:
    samples = fit.bootstrap.get("samples") or {}
    if not all(samples.get(name) for name in names):
        return None
    return [np.asarray(samples[name], dtype=float) for name in names]


def _derived(fit: FitResult, value: float, combine) -> dict:
    """A quantity derived from the raw parameters, its interval from the bootstrap samples."""
    drawn = _samples(fit, "alpha1", "alpha2", "alpha3")
    interval = [math.nan, math.nan]
    if drawn is not None:
        values = combine(*drawn)
        values = values[np.isfinite(values)]
        if values.size:
            interval = [float(v) for v in np.percentile(values, [2.5, 97.5])]
    ok, why = identified(None, value, interval, None)  # the fits' own rule for a derived exponent
    return {"value": value, "interval": interval, "identified": ok, "why": why}


def unit_quantity(fit: FitResult, name: str) -> dict:
    """alpha1 or alpha2 with D in the declared unit (see the module docstring)."""
    given = (extra(fit, "in_unit", {}) or {}).get(name)
    if given:
        return _normal(given)
    shift = math.log(tokens_per_unit(str(extra(fit, "token_unit", DEFAULT_TOKEN_UNIT))))
    index = ("alpha1", "alpha2").index(name)
    p = fit.params
    return _derived(fit, p[name] - shift * p["alpha3"], lambda a1, a2, a3: (a1, a2)[index] - shift * a3)


def invariant(fit: FitResult, name: str) -> dict:
    """alpha3 or alpha2 - alpha1, which no unit of D changes."""
    given = (extra(fit, "invariants", {}) or {}).get(name)
    if given:
        return _normal(given)
    p = fit.params
    if name == "alpha3":
        entry = fit.identification.get("alpha3", {})
        return {
            "value": float(p["alpha3"]),
            "interval": _pair(fit.interval.get("alpha3")),
            "identified": bool(entry.get("identified", True)),
            "why": entry.get("why", ""),
        }
    return _derived(fit, p["alpha2"] - p["alpha1"], lambda a1, a2, a3: a2 - a1)


def alpha3_identified(fit: FitResult) -> tuple[bool, str]:
    """Whether the fit identifies alpha3, and why not: its identification and its invariant
    say so, the optimisers agree, and a fit that ends on a bound has intervals that account for
    the bound (written with the bound-aware ``invariants``; a bootstrap that lands on the same
    bound is tight around the wrong answer)."""
    entry = fit.identification.get("alpha3", {})
    if not entry.get("identified", True):
        return False, str(entry.get("why") or "not identified")
    given = (extra(fit, "invariants", {}) or {}).get("alpha3")
    if given and not given.get("identified", False):
        return False, str(given.get("why") or "not identified")
    if fit.status == "not_converged":
        return False, "the two optimisers disagree"
    if fit.status == "at_bound" and not given:
        bound = ", ".join(fit.at_bound) or "a parameter"
        return False, f"{bound} on its bound and its intervals do not account for it"
    return True, ""


def irreducible_option(fit: FitResult) -> str | None:
    """The fit's ``fit.irreducible`` option (free | shared_dense) where it records one."""
    value = extra(fit, "irreducible")
    if isinstance(value, dict):
        value = value.get("option") or value.get("mode") or value.get("name")
    return None if value is None else str(value)
