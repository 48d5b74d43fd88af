"""The report's answers to the paper's questions, one sentence each with its numbers (pure).

``findings(fits: FitSet, guidance) -> list[dict]``: each ``{"topic", "subject", "sentence", "data"}``,
in the order the report prints them (``TOPICS``):

- the interaction alpha3 of every dataset and joint fit, its interval, and whether it excludes 0;
- the paper's ordering alpha2 > alpha1 > alpha3, at the estimate and its bootstrap probability;
- the interaction against its baseline: the AICc difference (an approximation at a robust
  fit) and the held-out gain;
- D2* for each D1 and both compute accountings, with its bootstrap interval or "inconclusive",
  and every crossing;
- the model-configuration law's exponents;
- the methods compared: alpha3 of each second-stage method against the data exponent of the
  same architecture trained from scratch;
- Drop-Upcycling's re-initialisation ratios r compared (:mod:`upcycling.analysis.reinit`; the
  report adds those findings, in this order);
- fit health: statuses, and parameters not identified by these runs with the extension of the
  sweep that would identify them.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from upcycling.analysis.fitresult import FitResult
from upcycling.analysis.fitset import UPCYCLED_LAWS, FitKey, FitSet

__all__ = ["TOPICS", "findings", "fmt"]

TOPICS = {
    "interaction": "The interaction alpha3 (saturation)",
    "ordering": "The ordering alpha2 > alpha1 > alpha3",
    "comparison": "Interaction against no interaction",
    "break_even": "When to stop upcycling (D2*)",
    "model_config": "The model-configuration law",
    "methods": "Methods compared with training from scratch",
    "reinit_ratio": "Drop-Upcycling: the re-initialisation ratio r",
    "health": "Fit health",
}


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


def _interval_text(fit: FitResult, name: str) -> str:
    low, high = fit.interval.get(name, [math.nan, math.nan])
    return f"[{fmt(low)}, {fmt(high)}]"


def _subject(fit: FitResult) -> str:
    return f"`{fit.key}`"


def _upcycled_fits(fits: FitSet) -> list[tuple[FitKey, FitResult]]:
    """The fitted dataset and joint laws by method, the joint law first within each."""
    chosen = fits.select(UPCYCLED_LAWS, fitted=True)
    return sorted(chosen, key=lambda item: (item[0].method or "", item[0].law != "joint", str(item[0])))


def _interaction(fit: FitResult) -> dict:
    low, high = fit.interval.get("alpha3", [math.nan, math.nan])
    excludes = bool(np.isfinite(low) and np.isfinite(high) and (low > 0 or high < 0))
    sign = "positive (saturation)" if low > 0 else "negative" if high < 0 else ""
    sentence = (
        f"{_subject(fit)}: alpha3 = {fmt(fit.params['alpha3'])} "
        f"{_interval_text(fit, 'alpha3')} (95% bootstrap); "
        + (
            f"the interval excludes 0: the interaction is {sign}."
            if excludes
            else "the interval includes 0: these runs do not resolve the interaction."
        )
    )
    if fit.status != "converged":
        sentence += f" (Fit status: {fit.status}.)"
    return {
        "topic": "interaction",
        "subject": fit.key,
        "sentence": sentence,
        "data": {
            "alpha3": fit.params["alpha3"],
            "interval": [low, high],
            "excludes_zero": excludes,
            "status": fit.status,
        },
    }


def _ordering(fit: FitResult) -> dict:
    p = fit.params
    holds = p["alpha2"] > p["alpha1"] > p["alpha3"]
    samples = fit.bootstrap.get("samples") or {}
    probability = math.nan
    if samples.get("alpha3"):
        a1, a2, a3 = (np.asarray(samples[name], dtype=float) for name in ("alpha1", "alpha2", "alpha3"))
        probability = float(np.mean((a2 > a1) & (a1 > a3)))
    sentence = (
        f"{_subject(fit)}: alpha2 = {fmt(p['alpha2'])}, alpha1 = {fmt(p['alpha1'])}, "
        f"alpha3 = {fmt(p['alpha3'])}: the ordering alpha2 > alpha1 > alpha3 "
        f"{'holds' if holds else 'does not hold'} at the estimate, and in "
        + (
            f"{100 * probability:.0f}% of the bootstrap samples."
            if math.isfinite(probability)
            else "(no bootstrap samples)."
        )
    )
    return {
        "topic": "ordering",
        "subject": fit.key,
        "sentence": sentence,
        "data": {"holds": holds, "probability": probability},
    }


def _comparison(fits: FitSet, key: FitKey, fit: FitResult) -> dict | None:
    base = fits.fitted(key.with_law(f"{key.law}_no_interaction"))
    if base is None:
        return None
    delta = base.aicc - fit.aicc
    gains = {}
    for variable in ("d2", "d1"):
        mine, theirs = fit.held_out.get(variable, {}), base.held_out.get(variable, {})
        if "rmse" in mine and "rmse" in theirs:
            gains[variable] = (theirs["rmse"], mine["rmse"])
    verdict = (
        "favours the interaction"
        if delta > 2
        else "favours no interaction"
        if delta < -2
        else "does not separate them (|ΔAICc| <= 2)"
    )
    held = "; ".join(
        f"held-out RMSE at the largest {v.upper()} {fmt(b)} without, {fmt(m)} with (gain {fmt(b - m)})"
        for v, (b, m) in gains.items()
    )
    sentence = (
        f"{_subject(fit)} against `{base.key}`: ΔAICc = {fmt(delta)} "
        f"(no-interaction minus interaction; a Gaussian approximation at a robust fit, "
        f"{fit.n_points} runs) {verdict}" + (f"; {held}." if held else ".")
    )
    return {
        "topic": "comparison",
        "subject": fit.key,
        "sentence": sentence,
        "data": {"delta_aicc": delta, "held_out": gains},
    }


def _crossing_text(row: dict) -> str:
    if not row.get("crossings"):
        return "no crossing"
    return ", ".join(f"{fmt(c['d2'])} ({c['better_after']} better after)" for c in row["crossings"])


def _break_even(rows: list[dict]) -> list[dict]:
    out = []
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["upcycled_fit"], row["size"], row["d1"]), []).append(row)
    for (key, size, d1), pair in groups.items():
        parts = []
        for row in sorted(pair, key=lambda r: r["count_sunk_cost"]):
            how = "with the dense cost counted" if row["count_sunk_cost"] else "without the dense cost"
            low, high = row["d2_star_interval"]
            estimate = (
                f"D2* = {fmt(row['d2_star'])} [{fmt(low)}, {fmt(high)}]"
                if row["status"] == "crossing"
                else "upcycling stays better in the searched range"
                if math.isinf(row["d2_star"])
                else "from scratch is better throughout the searched range"
            )
            parts.append(f"{how}, {estimate}, {row['verdict']}; crossings: {_crossing_text(row)}")
        sentence = (
            f"`{key}` (size {size}), D1 = {fmt(d1)}, against `{pair[0]['scratch_fit']}` "
            f"(D2 searched over {fmt(pair[0]['d2_range'][0])} to "
            f"{fmt(pair[0]['d2_range'][1])}): " + "; ".join(parts) + "."
        )
        out.append(
            {
                "topic": "break_even",
                "subject": key,
                "sentence": sentence,
                "data": {"size": size, "d1": d1, "rows": pair},
            }
        )
    return out


def _model_config(fits: FitSet) -> list[dict]:
    out = []
    for _, fit in fits.select(["model_config"]):
        if not fit.ok:
            sentence = f"{_subject(fit)} was not fitted: {fit.reason}"
        else:
            p = fit.params
            sentence = (
                f"{_subject(fit)} (D1 = {fmt(fit.context.get('d1_tokens'))}, "
                f"D2 = {fmt(fit.context.get('d2_tokens'))}, {fit.n_points} runs): "
                f"beta1 (sparsity P) = {fmt(p['beta1'])} {_interval_text(fit, 'beta1')}, "
                f"beta2 (active parameters N2) = {fmt(p['beta2'])} "
                f"{_interval_text(fit, 'beta2')}, E = {fmt(p['E'])}; status {fit.status}."
            )
        out.append({"topic": "model_config", "subject": fit.key, "sentence": sentence, "data": {"status": fit.status}})
    return out


def _across_methods(fits: FitSet) -> list[dict]:
    """One sentence ranking the methods by alpha3 (joint law, else the per-size laws)."""
    by_method: dict[str | None, FitResult] = {}
    for key, fit in _upcycled_fits(fits):  # joint first within each method
        by_method.setdefault(key.method, fit)
    if len(by_method) < 2:
        return []
    ranked = sorted(by_method.items(), key=lambda item: -item[1].params["alpha3"])
    text = ""
    for index, (method, fit) in enumerate(ranked):
        if index:
            above = ranked[index - 1][1].interval.get("alpha3", [math.nan] * 2)[0]
            below = fit.interval.get("alpha3", [math.nan] * 2)[1]
            text += " > " if above > below else " ~ "  # ~: the 95% intervals overlap
        text += f"{method} {fmt(fit.params['alpha3'])} {_interval_text(fit, 'alpha3')}"
    return [
        {
            "topic": "methods",
            "subject": "all",
            "data": {m: f.params["alpha3"] for m, f in ranked},
            "sentence": f"Saturation alpha3 by method (`{ranked[0][1].law}` laws), largest "
            f"first: {text} ('>': the 95% intervals separate them; '~': they "
            f"overlap).",
        }
    ]


def _methods(fits: FitSet) -> list[dict]:
    out = _across_methods(fits)
    for key, fit in _upcycled_fits(fits):
        method = key.method
        scratch_match = fits.scratch_for(key)
        scratch = scratch_match[1] if scratch_match is not None else None
        d1_max = max(fit.context.get("d1_values") or [math.nan])
        gamma = fit.params["alpha2"] - fit.params["alpha3"] * math.log(d1_max)
        text = (
            f"{_subject(fit)} ({method}): alpha3 = {fmt(fit.params['alpha3'])} "
            f"{_interval_text(fit, 'alpha3')}; effective D2 exponent alpha2 - alpha3 ln D1 "
            f"= {fmt(gamma)} at the largest D1 ({fmt(d1_max)})"
        )
        if scratch is not None:
            beta = scratch.params["beta"]
            text += (
                f", against the data exponent beta = {fmt(beta)} "
                f"{_interval_text(scratch, 'beta')} of `{scratch.key}` trained from scratch"
                f" ({'slower' if gamma < beta else 'faster'} than from scratch)"
            )
        else:
            text += "; no from-scratch law of this method to compare with"
        out.append(
            {
                "topic": "methods",
                "subject": fit.key,
                "sentence": text + ".",
                "data": {
                    "method": method,
                    "alpha3": fit.params["alpha3"],
                    "effective_exponent": gamma,
                    "scratch_beta": scratch.params["beta"] if scratch else None,
                },
            }
        )
    return out


def _health(fits: FitSet) -> list[dict]:
    fitted = [fit for fit in fits.values() if fit.ok]
    counts = {
        status: sum(fit.status == status for fit in fitted)
        for status in ("converged", "at_bound", "singular", "not_converged")
    }
    skipped = sum(not fit.ok for fit in fits.values())
    out = [
        {
            "topic": "health",
            "subject": "all",
            "data": counts,
            "sentence": f"{counts['converged']} of {len(fitted)} fitted laws converged cleanly; "
            f"{counts['at_bound']} end on a bound, {counts['singular']} have a "
            f"singular J^T J, {counts['not_converged']} did not converge; "
            f"{skipped} laws were not fitted (see 'Laws not fitted').",
        }
    ]
    for fit in sorted(fitted, key=lambda f: f.key):
        if fit.status != "converged":
            out.append(
                {
                    "topic": "health",
                    "subject": fit.key,
                    "data": {"status": fit.status},
                    "sentence": f"{_subject(fit)} is {fit.status.replace('_', ' ')}: {fit.status_detail}.",
                }
            )
        if fit.law.endswith(("_no_interaction", "_additive")):
            continue  # baselines: counted below, not itemised
        for name in fit.not_identified():
            entry = fit.identification[name]
            if name in fit.at_bound:
                sentence = (
                    f"{_subject(fit)}: {name} = {fmt(fit.params[name])} sits on its bound "
                    f"({fit.at_bound[name]}): not identified by these runs, and the "
                    f"local Fisher information cannot say which runs would identify it."
                )
            else:
                fix = (
                    f"{entry['extension']} would identify it (predicted interval "
                    f"[{fmt(entry['predicted_interval'][0])}, "
                    f"{fmt(entry['predicted_interval'][1])}])"
                    if entry.get("extension")
                    else entry.get("extension_note", "")
                )
                sentence = (
                    f"{_subject(fit)}: {name} = {fmt(fit.params[name])} is not identified "
                    f"by these runs ({entry['why']}); {fix}."
                )
            out.append({"topic": "health", "subject": fit.key, "data": entry, "sentence": sentence})
    baselines = [
        fit.key for fit in fitted if fit.law.endswith(("_no_interaction", "_additive")) and fit.not_identified()
    ]
    if baselines:
        out.append(
            {
                "topic": "health",
                "subject": "baselines",
                "data": {"fits": baselines},
                "sentence": f"{len(baselines)} baseline fits leave parameters not identified "
                f"(see the tables): {', '.join(f'`{k}`' for k in baselines)}.",
            }
        )
    return out


def findings(fits: FitSet, guidance: list[dict]) -> list[dict]:
    """Every finding of the report, in ``TOPICS`` order (see the module docstring)."""
    upcycled = _upcycled_fits(fits)
    out = [_interaction(fit) for _, fit in upcycled]
    out += [_ordering(fit) for _, fit in upcycled]
    out += [entry for key, fit in upcycled if (entry := _comparison(fits, key, fit)) is not None]
    out += _break_even(guidance)
    out += _model_config(fits)
    out += _methods(fits)
    out += _health(fits)
    return out
