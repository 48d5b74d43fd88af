"""Guidance from the fitted laws: when to stop upcycling, with uncertainty, and ``predict`` for
planning one configuration. The break-even mathematics is :mod:`upcycling.analysis.guidance`.

Public functions (which from-scratch fit belongs to which upcycled one is the fit set's
answer, :meth:`upcycling.analysis.fitset.FitSet.upcycled_pairs`):

- ``compute_guidance(fits: FitSet) -> list[dict]``: per pair, D1 and compute accounting: D2*
  with a bootstrap interval, whether it is conclusive, and every crossing
- ``predict(fits, n1, d1, d2, experts, top_k, granularity=1, *, method="moe_upcycle", n2=None,
  count_sunk_cost=False, level=0.95, reinit_ratio=0.0) -> dict``: predicted loss with a bootstrap interval and
  the recommendation (upcycle or train from scratch)

Compute: C = 6 N D with N the active parameters under the fits' counting convention
(``parameter_counts`` in each fit's context; docs/fits.md). D2* is searched over the runs' D2
range plus one decade on each side (``guidance.search_range``): it is *inconclusive* when its
bootstrap interval reaches an end of that range (or infinity, or zero), and *extrapolated*
when the estimate lies outside the runs' D2.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from upcycling.analysis import guidance as guide
from upcycling.analysis.fitresult import FitResult, to_jsonable
from upcycling.analysis.fitset import FitKey, FitSet, MoeVariant
from upcycling.analysis.laws import get_law

__all__ = ["compute_guidance", "predict"]


def _interval(samples, level: float = 0.95) -> list[float]:
    """Percentile interval that keeps infinities (inverted CDF: no inf - inf interpolation)."""
    samples = np.asarray(samples, dtype=float)
    samples = samples[~np.isnan(samples)]
    if samples.size == 0:
        return [math.nan, math.nan]
    tail = (1 - level) / 2
    return [
        float(np.quantile(samples, tail, method="inverted_cdf")),
        float(np.quantile(samples, 1 - tail, method="inverted_cdf")),
    ]


def _verdict(d2_star: float, interval: list[float], d2_range, data_range) -> tuple[bool, str]:
    low, high = interval
    if (
        not (np.isfinite(low) and np.isfinite(high))
        or low <= d2_range[0] * 1.0001
        or high >= d2_range[1] / 1.0001
        or low <= 0
    ):
        edge = "infinity" if not np.isfinite(high) else "zero" if low <= 0 else "the end of the searched range"
        return False, f"inconclusive: the bootstrap interval reaches {edge}"
    if not data_range[0] <= d2_star <= data_range[1]:
        return True, "extrapolated beyond the runs' D2"
    return True, "within the runs' D2"


def compute_guidance(fits: FitSet, level: float = 0.95) -> list[dict]:
    """For every (upcycled fit, size) with a from-scratch counterpart, every D1 that was run
    and both compute accountings: D2* and its status, the bootstrap interval of D2*, whether it
    is conclusive, every crossing, the closed form where one exists, and the effective D2
    exponent alpha2 - alpha3 ln D1."""
    rows = []
    for pair in fits.upcycled_pairs():
        fit, size, scratch = pair.upcycled, pair.size, pair.scratch
        n1, n2 = fit.context["sizes"][size]["n1"], fit.context["sizes"][size]["n2"]
        d2_values = fit.context.get("d2_values") or fit.data_range["d2"]
        d2_range = guide.search_range(d2_values)
        data_range = (min(d2_values), max(d2_values))
        upcycled_fn = guide.upcycled_loss_fn(fit, n1)
        scratch_fn = guide.scratch_loss_fn(scratch, n2)
        for table_row in guide.guidance_table(
            fit, scratch, fit.context.get("d1_values", []), n1=n1, n2=n2, d2_range=d2_range
        ):
            d1, counted = table_row["d1"], table_row["count_sunk_cost"]
            samples = guide.break_even_samples(
                fit, scratch, d1, n1=n1, n2=n2, count_sunk_cost=counted, d2_range=d2_range
            )
            interval = _interval(samples, level)
            conclusive, verdict = _verdict(table_row["d2_star"], interval, d2_range, data_range)
            if table_row["status"] != "crossing":
                conclusive = False
                verdict = "no crossing in the searched range" + (
                    "" if verdict.startswith("inconclusive") else f" ({verdict})"
                )
            rows.append(
                {
                    "upcycled_fit": str(pair.upcycled_key),
                    "scratch_fit": str(pair.scratch_key),
                    "method": pair.upcycled_key.method,
                    "size": size,
                    "moe": str(pair.upcycled_key.moe),
                    **table_row,
                    "d2_star_interval": interval,
                    "level": level,
                    "n_samples": int(samples.size),
                    "conclusive": conclusive,
                    "verdict": verdict,
                    "data_d2_range": list(data_range),
                    "crossings": guide.crossings(
                        upcycled_fn, scratch_fn, d1, n1=n1, n2=n2, count_sunk_cost=counted, d2_range=d2_range
                    ),
                }
            )
    return rows


# --------------------------------------------------------------------------------------------
# Planning: predict one configuration
# --------------------------------------------------------------------------------------------


def _matching_size(sizes: Mapping[str, Mapping[str, float]], n1: float) -> str | None:
    for size, info in sizes.items():
        if math.isclose(info["n1"], n1, rel_tol=0.02):
            return size
    return None


def _active_params(sizes: Mapping[str, Mapping[str, float]], n1: float) -> tuple[float, str]:
    """N2 for a dense size N1: that of a run size, else log-log interpolated across sizes."""
    size = _matching_size(sizes, n1)
    if size is not None:
        return sizes[size]["n2"], f"N2 of size {size!r}"
    if len(sizes) < 2:
        raise ValueError("n2 (active parameters) is needed: no run size matches n1")
    log_n1 = np.log([info["n1"] for info in sizes.values()])
    log_n2 = np.log([info["n2"] for info in sizes.values()])
    slope, intercept = np.polyfit(log_n1, log_n2, 1)
    return float(np.exp(intercept + slope * math.log(n1))), "log-log interpolation across sizes"


def _upcycled_fit(fits: FitSet, n1: float, moe: MoeVariant, method: str) -> tuple[FitKey, FitResult, str | None]:
    """The joint law of this method and variant when fitted, else the dataset law of the size
    whose N1 is n1; with that size (None: the joint law at an N1 that was not run)."""
    joint_key = FitKey("joint", method, moe=moe)
    joint_fit = fits.fitted(joint_key)
    if joint_fit is not None:
        return joint_key, joint_fit, _matching_size(joint_fit.context.get("sizes", {}), n1)
    for key, fit in fits.select(["dataset"], method=method, moe=moe, fitted=True):
        size = fit.context["size"]
        if _matching_size({size: fit.context["sizes"][size]}, n1) is not None:
            return key, fit, size
    raise ValueError(
        f"no fitted law predicts a {method} {moe} model from a dense model of "
        f"{n1:g} parameters (need joint.{method}.{moe}, or "
        f"dataset.{method}.<size>.{moe} of a size with that N1)"
    )


def predict(
    fits: Mapping[str, FitResult],
    n1: float,
    d1: float,
    d2: float,
    experts: int,
    top_k: int,
    granularity: int = 1,
    *,
    method: str = "moe_upcycle",
    n2: float | None = None,
    count_sunk_cost: bool = False,
    level: float = 0.95,
    reinit_ratio: float = 0.0,
) -> dict[str, Any]:
    """Predicted loss of upcycling a dense model of n1 parameters (counted as the fits count
    them) trained on d1 tokens into an MoE (experts, top_k, granularity) trained on d2 tokens,
    with a bootstrap interval, and the recommendation against training it from scratch with
    the same compute; ``reinit_ratio``: Drop-Upcycling's r of the fits to use. Uses the joint law when fitted, else the dataset law of the run size
    whose N1 matches n1. ``count_sunk_cost``: whether the dense model's compute counts against
    upcycling; both accountings are reported, ``recommendation`` follows this one. ``fits``: by
    key string, as ``load_fits`` reads them.
    """
    fit_set = FitSet.of(fits)
    moe = MoeVariant(int(experts), int(top_k), int(granularity), float(reinit_ratio))
    notes: list[str] = []
    upcycled_key, upcycled, size = _upcycled_fit(fit_set, n1, moe, method)
    sizes = upcycled.context.get("sizes", {})
    if n2 is None:
        n2, how = _active_params(sizes, n1)
        notes.append(f"n2 = {n2:.6g} from {how}")
    counts = upcycled.context.get("parameter_counts", "non_embedding")
    notes.append(f"parameter counts: {counts} (n1, n2 must be counted the same way)")
    for variable, value in (("d1", d1), ("d2", d2), ("n1", n1)):
        low, high = upcycled.data_range.get(variable, (value, value))
        if not low <= value <= high:
            notes.append(f"{variable} = {value:.3g} is outside the runs ({low:.3g} to {high:.3g}): extrapolated")
    if upcycled.status != "converged":
        notes.append(f"{upcycled_key}: status {upcycled.status} ({upcycled.status_detail})")

    variables = {"d1": d1, "d2": d2, **({"n1": n1} if upcycled.law == "joint" else {})}
    loss = float(upcycled.predict(**variables))
    loss_samples = upcycled.predict_samples(**variables)
    out: dict[str, Any] = {
        "inputs": {
            "n1": n1,
            "d1": d1,
            "d2": d2,
            "experts": experts,
            "top_k": top_k,
            "granularity": granularity,
            "n2": n2,
            "method": method,
        },
        "law": str(upcycled_key),
        "loss": loss,
        "interval": _interval(loss_samples, level),
        "level": level,
        "flops_upcycled": 6.0 * n2 * d2,
        "flops_dense": 6.0 * n1 * d1,
    }
    scratch_match = fit_set.scratch_for(upcycled_key, size)
    if scratch_match is None:
        notes.append("no from-scratch law fitted for this configuration: no recommendation")
        out.update(recommendation=None, by_accounting={}, notes=notes)
        return to_jsonable(out)
    scratch_key, scratch = scratch_match

    scratch_loss = guide.scratch_loss_fn(scratch, n2)
    upcycled_fn = guide.upcycled_loss_fn(upcycled, n1)
    d2_low, d2_high = guide.search_range(upcycled.data_range["d2"])
    d2_range = (min(d2_low, d2 / 10), max(d2_high, d2 * 10))
    by_accounting = {}
    for counted in (False, True):
        d_s = float(guide.scratch_tokens(d1, d2, n1, n2, counted))
        scratch_value = float(scratch_loss(d_s))
        scratch_variables = {"d": d_s, **({"n": n2} if "n" in get_law(scratch.law).variables else {})}
        scratch_samples = scratch.predict_samples(**scratch_variables)
        paired = min(len(loss_samples), len(scratch_samples))
        break_even = guide.break_even_d2(
            upcycled_fn, scratch_loss, d1, n1=n1, n2=n2, count_sunk_cost=counted, d2_range=d2_range
        )
        by_accounting["sunk_cost_counted" if counted else "sunk_cost_not_counted"] = {
            "scratch_law": str(scratch_key),
            "scratch_tokens": d_s,
            "scratch_loss": scratch_value,
            "scratch_interval": _interval(scratch_samples, level),
            "recommendation": "upcycle" if loss < scratch_value else "scratch",
            # share of (independent) bootstrap pairs in which upcycling is better
            "p_upcycle_better": (
                float(np.mean(loss_samples[:paired] < scratch_samples[:paired])) if paired else math.nan
            ),
            "break_even_d2": break_even.d2_star,
            "break_even_status": break_even.status,
            "break_even_interval": _interval(
                guide.break_even_samples(
                    upcycled, scratch, d1, n1=n1, n2=n2, count_sunk_cost=counted, d2_range=d2_range
                ),
                level,
            ),
            "d2_range": list(d2_range),
        }
    for fit in (upcycled, scratch):
        if fit.bootstrap.get("note"):
            notes.append(f"{fit.key}: {fit.bootstrap['note']}")
    chosen = by_accounting["sunk_cost_counted" if count_sunk_cost else "sunk_cost_not_counted"]
    out.update(
        recommendation=chosen["recommendation"],
        count_sunk_cost=count_sunk_cost,
        by_accounting=by_accounting,
        notes=notes,
    )
    return to_jsonable(out)
