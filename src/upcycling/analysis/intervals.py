"""The fits' 95% intervals: profile likelihood over the parameters' physical ranges, the token
unit, and the unit-free quantities (:mod:`upcycling.analysis.profile` says how a profile is made).

- ``TOKEN_UNITS``: unit name -> tokens per unit
- ``unit_directions(law, unscale, token_unit) -> (in_unit, invariants)``: linear quantities
  of the fit-space parameters (natural-unit rows), by name
- ``profile_fit(...) -> ProfiledFit``: every parameter's natural interval, what its
  identification is judged on, and the token-unit block
- ``params_in_unit(params, token_unit) -> dict``: the law's parameters for D in that unit

Token unit. Written with D = u d (d in the unit u), the dataset law's D1 and D2 exponents are
alpha1 - alpha3 ln u and alpha2 - alpha3 ln u (both shift by -alpha3 ln u: the cross term
alpha3 ln D1 ln D2 expands to alpha3 (ln u + ln d1)(ln u + ln d2)), A becomes A u^-(alpha1 +
alpha2) u^(alpha3 ln u), and alpha3 and alpha2 - alpha1 do not change: they are the unit-free
quantities. An ordering such as alpha1 > alpha3 therefore only means something in a stated unit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from upcycling.analysis.identify import identified
from upcycling.analysis.laws import Law
from upcycling.analysis.optimize import LogProblem
from upcycling.analysis.profile import ProfileInterval, Profiler, objective_scale, threshold

__all__ = ["DEFAULT_TOKEN_UNIT", "TOKEN_UNITS", "ProfiledFit", "params_in_unit", "profile_fit", "unit_directions"]

TOKEN_UNITS = {"tokens": 1.0, "millions": 1e6, "billions": 1e9, "trillions": 1e12}
DEFAULT_TOKEN_UNIT = "billions"


def unit_directions(law: Law, unscale: np.ndarray, token_unit: str) -> tuple[dict, dict]:
    """alpha1 and alpha2 in ``token_unit``, and the invariants alpha3 and alpha2 - alpha1, as rows
    c with quantity = c @ theta_scaled; empty for a law without the D1-D2 interaction."""
    if token_unit not in TOKEN_UNITS:
        raise ValueError(f"token unit {token_unit!r}: use one of {', '.join(TOKEN_UNITS)}")
    names = law.natural_names
    if not {"alpha1", "alpha2", "alpha3"} <= set(names):
        return {}, {}
    row = {name: unscale[names.index(name)] for name in ("alpha1", "alpha2", "alpha3")}
    shift = math.log(TOKEN_UNITS[token_unit])
    in_unit = {"alpha1": row["alpha1"] - shift * row["alpha3"], "alpha2": row["alpha2"] - shift * row["alpha3"]}
    invariants = {"alpha3": row["alpha3"], "alpha2_minus_alpha1": row["alpha2"] - row["alpha1"]}
    return in_unit, invariants


@dataclass
class ProfiledFit:
    interval: dict[str, list[float]]  # natural units; +-inf where open
    judged: dict[str, ProfileInterval]  # fit-space value identification is judged on
    in_unit: dict[str, dict[str, Any]] = field(default_factory=dict)
    invariants: dict[str, dict[str, Any]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


def _quantity(profile: ProfileInterval) -> dict[str, Any]:
    ok, why = identified(None, profile.value, profile.as_list(), None)
    return {"value": profile.value, "interval": profile.as_list(), "identified": ok, "why": why}


def profile_fit(
    law: Law,
    problem: LogProblem,
    theta: np.ndarray,
    bounds: np.ndarray,
    unscale: np.ndarray,
    log_residuals: np.ndarray,
    held: np.ndarray,
    covariance: np.ndarray | None,
    token_unit: str = DEFAULT_TOKEN_UNIT,
) -> ProfiledFit:
    """Profile intervals of every parameter (natural units and judged), and of the token-unit
    quantities. ``held``: parameters fixed by the caller (E shared with the dense fit);
    ``covariance``: the delta-method covariance in fit space (first steps only)."""
    n_free = int((~held).sum())
    kappa = objective_scale(log_residuals, n_free, problem.delta)
    bound = threshold(log_residuals.size, n_free)
    physical_low = np.array([spec.is_log_amplitude for spec in law.params])
    profiler = Profiler(problem, theta, bounds, physical_low, kappa, bound, covariance, held)
    interval: dict[str, list[float]] = {}
    judged: dict[str, ProfileInterval] = {}
    evaluations = 0
    for i, spec in enumerate(law.params):
        unit = np.eye(law.n_params)[i]
        if spec.is_log_amplitude:
            term = profiler.interval(unit, physical_floor=float(bounds[i, 0]))
            judged[spec.natural] = term
            natural = term if np.allclose(unscale[i], unit) else profiler.interval(unscale[i])
            low = 0.0 if natural.low <= bounds[i, 0] + 1e-9 or natural.low_open else math.exp(natural.low)
            interval[spec.natural] = [low, math.inf if natural.high_open else math.exp(natural.high)]
            evaluations += term.evaluations + (natural.evaluations if natural is not term else 0)
        else:
            judged[spec.natural] = profiler.interval(unscale[i])
            interval[spec.natural] = judged[spec.natural].as_list()
            evaluations += judged[spec.natural].evaluations
    in_unit_rows, invariant_rows = unit_directions(law, unscale, token_unit)
    in_unit = {name: _quantity(profiler.interval(c)) for name, c in in_unit_rows.items()}
    invariants = {}
    for name, c in invariant_rows.items():
        profile = judged["alpha3"] if name == "alpha3" else profiler.interval(c)
        invariants[name] = _quantity(profile)
    info = {
        "method": "profile likelihood (each quantity held, every other parameter refitted within its bounds)",
        "statistic": "2 kappa (Huber(profile) - Huber(fit)), kappa = E[psi'] / E[psi^2] at the fit's noise",
        "kappa": kappa,
        "threshold": bound,
        "evaluations": evaluations,
    }
    return ProfiledFit(interval, judged, in_unit, invariants, info)


def params_in_unit(params: Mapping[str, float], token_unit: str) -> dict[str, float]:
    """The dataset (or joint) law's parameters for D in ``token_unit`` (module docstring): the
    same predictions at D / u as ``params`` at D."""
    shift = math.log(TOKEN_UNITS[token_unit])
    a1, a2, a3 = (float(params[name]) for name in ("alpha1", "alpha2", "alpha3"))
    out = {name: float(value) for name, value in params.items()}
    out.update(
        A=float(params["A"]) * math.exp(-(a1 + a2) * shift + a3 * shift**2),
        alpha1=a1 - a3 * shift,
        alpha2=a2 - a3 * shift,
    )
    return out
