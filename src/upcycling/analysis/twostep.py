"""The two-step cross-check of alpha3 (Liew & Kato, "From Acceleration to Saturation",
arXiv 2510.06548): a power law in D2 alone at each D1, then its exponent against ln D1.

At fixed D1 the dataset law L = A D1^-alpha1 D2^(-alpha2 + alpha3 ln D1) + E is exactly
L = E + B D2^-beta with B = A D1^-alpha1 and beta = alpha2 - alpha3 ln D1. Step one fits that
law (``scratch_power``, E free and >= 0) to the runs of each D1, with its profile interval of
beta; step two regresses beta on ln D1, weighted by 1 / se^2 (se from each interval's width,
D1 values whose interval is unbounded left out). The regression's slope is -alpha3, so the
reported ``slope`` is its negative, the two-step estimate of alpha3, comparable with the joint
fit's; its interval is the weighted regression's t interval, its standard error scaled up by
the scatter about the line when that exceeds the per-D1 intervals (and z = 1.96 with only two
D1 values).

- ``two_step(d1, d2, loss, huber_delta=..., joint_alpha3=None) -> dict`` (the fit JSON's
  ``two_step`` block)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy import stats

from upcycling.analysis.fitresult import DEFAULT_HUBER_DELTA
from upcycling.analysis.fitting import fit_law

__all__ = ["two_step"]

_Z95 = 1.959963984540054
_STARTS = 4  # grid starts of each per-D1 fit (three parameters, one valley)
_DEFINITION = "slope = -d(beta)/d(ln D1), beta the D2 exponent of L = E + B D2^-beta at each D1: an estimate of alpha3"


def _weighted_slope(x: np.ndarray, y: np.ndarray, se: np.ndarray) -> tuple[float, float, int]:
    """Slope of y on x weighted by 1/se^2, its standard error and the degrees of freedom."""
    w = 1.0 / se**2
    x_mean = float(np.sum(w * x) / np.sum(w))
    spread = float(np.sum(w * (x - x_mean) ** 2))
    slope = float(np.sum(w * (x - x_mean) * y) / spread)
    intercept = float(np.sum(w * y) / np.sum(w)) - slope * x_mean
    dof = x.size - 2
    scale = 1.0
    if dof > 0:
        chi2 = float(np.sum(w * (y - intercept - slope * x) ** 2)) / dof
        scale = math.sqrt(max(chi2, 1.0))
    return slope, scale / math.sqrt(spread), dof


def two_step(
    d1,
    d2,
    loss,
    *,
    huber_delta: float = DEFAULT_HUBER_DELTA,
    joint_alpha3: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The two-step estimate of alpha3 from runs at (d1, d2) with ``loss`` (module docstring)."""
    d1, d2, loss = (np.asarray(a, dtype=float).reshape(-1) for a in (d1, d2, loss))
    per_d1: list[dict[str, Any]] = []
    for value in np.unique(d1[np.isfinite(loss)]):
        at = (d1 == value) & np.isfinite(loss)
        entry: dict[str, Any] = {"d1": float(value), "n_runs": int(at.sum())}
        try:
            fit = fit_law(
                "scratch_power",
                {"d": d2[at], "loss": loss[at]},
                huber_delta=huber_delta,
                n_bootstrap=0,
                holdout=False,
                n_starts=_STARTS,
            )
        except ValueError as error:
            entry.update(exponent=math.nan, interval=[math.nan, math.nan], skipped=str(error))
        else:
            entry.update(exponent=fit.params["beta"], interval=list(fit.interval["beta"]), status=fit.status)
        per_d1.append(entry)
    usable = [e for e in per_d1 if all(math.isfinite(v) for v in e["interval"]) and e["interval"][1] > e["interval"][0]]
    out: dict[str, Any] = {"definition": _DEFINITION, "per_d1": per_d1, "n_used": len(usable)}
    if joint_alpha3 is not None:
        out["joint_alpha3"] = dict(joint_alpha3)
    if len(usable) < 2:
        out["slope"] = {"value": math.nan, "interval": [math.nan, math.nan]}
        out["note"] = f"{len(usable)} D1 value(s) with a bounded exponent interval: the slope needs 2"
        return out
    x = np.log([e["d1"] for e in usable])
    y = np.array([e["exponent"] for e in usable])
    se = np.array([(e["interval"][1] - e["interval"][0]) / (2 * _Z95) for e in usable])
    slope, slope_se, dof = _weighted_slope(x, y, se)
    half = (float(stats.t.ppf(0.975, dof)) if dof > 0 else _Z95) * slope_se
    out["slope"] = {"value": -slope, "interval": [-slope - half, -slope + half], "stderr": slope_se}
    out["exponent_slope"] = {"value": slope, "interval": [slope - half, slope + half]}
    return out
