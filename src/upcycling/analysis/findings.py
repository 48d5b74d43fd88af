"""The report's answers to the paper's questions, one sentence each with its numbers (pure).

``findings(fits: FitSet, guidance) -> list[dict]``: each ``{"topic", "subject", "sentence",
"data", "summary"}``, in ``TOPICS`` order. ``summary`` true: the sentence is one of the report's
few findings lines (one per method and topic, and one per cause of ill health); false: the
per-fit detail, in findings.json only. Per fit:

- the interaction alpha3 of every dataset and joint fit with its interval; a sign is claimed
  only where the fit identifies alpha3 (:func:`alpha3_identified`), never from a fit that does
  not, whatever its interval says;
- the paper's ordering alpha2 > alpha1 > alpha3 in the declared token unit (``fit.token_unit``:
  alpha1 and alpha2 depend on the unit of D, :mod:`upcycling.analysis.units`), with the unit-free
  quantities alpha3 and alpha2 - alpha1 and their intervals beside it;
- the two-step cross-check (per-D1 D2 exponents against ln D1) beside the joint fit's alpha3;
- the interaction against its baseline: the AICc difference and the held-out gain;
- D2* for each D1 and both compute accountings (the report's opening tables);
- the model-configuration law's exponents; the methods compared with training from scratch;
- Drop-Upcycling's re-initialisation ratios r (:mod:`upcycling.analysis.reinit`, added by the
  report);
- fit health, grouped by cause (:mod:`upcycling.analysis.health`).
"""

from __future__ import annotations

import math
from typing import Any

from upcycling.analysis.fitresult import FitResult
from upcycling.analysis.fitset import COMPARED_LAWS, FitKey, FitSet
from upcycling.analysis.health import health_findings
from upcycling.analysis.units import (
    alpha3_identified,
    extra,
    fmt,
    interval_text,
    invariant,
    irreducible_option,
    quantity_text,
    token_unit,
    unit_quantity,
)

__all__ = ["TOPICS", "alpha3_identified", "findings", "fmt"]

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


def _item(topic: str, subject: Any, sentence: str, data: dict, summary: bool = False) -> dict:
    return {"topic": topic, "subject": str(subject), "sentence": sentence, "data": data, "summary": summary}


def _upcycled_fits(fits: FitSet) -> list[tuple[FitKey, FitResult]]:
    """The fitted dataset and joint laws by method, the joint law first within each."""
    chosen = fits.select(COMPARED_LAWS, fitted=True)
    return sorted(chosen, key=lambda item: (item[0].method or "", item[0].law != "joint", str(item[0])))


def _by_method(fits: FitSet) -> dict[str, list[tuple[FitKey, FitResult]]]:
    out: dict[str, list[tuple[FitKey, FitResult]]] = {}
    for key, fit in _upcycled_fits(fits):
        out.setdefault(str(key.method), []).append((key, fit))
    return out


def _label(key: FitKey) -> str:
    """A fit within its method's line: the joint law, or the dataset law by its size (and its MoE
    variant where it is not e.g. the method's only one: r > 0 writes its ratio)."""
    if key.law == "joint":
        return "joint" if key.moe is None or not key.moe.reinit_ratio else f"joint {key.moe}"
    return f"{key.size}" if key.moe is None or not key.moe.reinit_ratio else f"{key.size} {key.moe}"


def _sign(fit: FitResult) -> tuple[str, bool, bool]:
    """(verdict words, excludes 0, identified): a sign only from an identified alpha3."""
    entry = invariant(fit, "alpha3")
    low, high = entry["interval"]
    excludes = bool(math.isfinite(low) and math.isfinite(high) and (low > 0 or high < 0))
    identified, why = alpha3_identified(fit)
    if not identified:
        return f"not identified: {why}; no sign claimed", excludes, False
    if not excludes:
        return "includes 0", excludes, True
    return ("> 0: saturation" if low > 0 else "< 0"), excludes, True


def _interaction(fit: FitResult) -> dict:
    entry = invariant(fit, "alpha3")
    verdict, excludes, identified = _sign(fit)
    step = _two_step_text(fit)
    sentence = (
        f"`{fit.key}`: alpha3 = {quantity_text(entry)}; {verdict}"
        + (f"; two-step estimate {step}" if step else "")
        + (f" (fit status: {fit.status})." if fit.status != "converged" else ".")
    )
    data = {
        "alpha3": entry["value"],
        "interval": entry["interval"],
        "excludes_zero": excludes,
        "identified": identified,
        "sign": (None if not identified or not excludes else "positive" if entry["interval"][0] > 0 else "negative"),
        "status": fit.status,
        "two_step": extra(fit, "two_step", {}),
    }
    return _item("interaction", fit.key, sentence, data)


def _two_step_text(fit: FitResult) -> str | None:
    two_step = extra(fit, "two_step")
    slope = two_step.get("slope") if isinstance(two_step, dict) else None
    if not slope:
        return None
    return quantity_text(slope)


def _interaction_line(method: str, members: list[tuple[FitKey, FitResult]]) -> dict:
    """alpha3 of every law of the method, each dataset law's two-step estimate beside it."""
    parts, steps = [], {}
    for key, fit in members:
        verdict, _, _ = _sign(fit)
        step = _two_step_text(fit)
        if step is not None:
            steps[str(key)] = step
        parts.append(
            f"{_label(key)} {quantity_text(invariant(fit, 'alpha3'))} ({verdict}"
            + (f"; two-step {step}" if step else "")
            + ")"
        )
    sentence = f"{method}: alpha3 [95%] by law: " + "; ".join(parts) + "."
    if steps:
        sentence += " Two-step: power laws in D2 at each D1, minus the slope of their exponents against ln D1."
    return _item("interaction", method, sentence, {"fits": [str(key) for key, _ in members], "two_step": steps}, True)


def _ordering(fit: FitResult, unit: str) -> dict:
    a1, a2 = unit_quantity(fit, "alpha1"), unit_quantity(fit, "alpha2")
    a3, gap = invariant(fit, "alpha3"), invariant(fit, "alpha2_minus_alpha1")
    holds = a2["value"] > a1["value"] > a3["value"]
    separated = a2["interval"][0] > a1["interval"][1] and a1["interval"][0] > a3["interval"][1]
    identified = all(entry.get("identified", False) for entry in (a1, a2)) and alpha3_identified(fit)[0]
    verdict = (
        "holds, the intervals separate them"
        if holds and separated and identified
        else "holds at the estimate only (intervals overlap or not identified)"
        if holds
        else "does not hold at the estimate"
    )
    sentence = (
        f"`{fit.key}`, D in {unit}: alpha2 = {quantity_text(a2)}, alpha1 = {quantity_text(a1)}, "
        f"alpha3 = {quantity_text(a3)}: {verdict}; unit-free alpha2 - alpha1 = {quantity_text(gap)}."
    )
    data = {
        "token_unit": unit,
        "verdict": verdict,
        "holds": holds,
        "separated": bool(separated and identified),
        "alpha1": a1,
        "alpha2": a2,
        "alpha3": a3,
        "alpha2_minus_alpha1": gap,
    }
    return _item("ordering", fit.key, sentence, data)


def _ordering_line(method: str, items: list[dict], unit: str) -> dict:
    head = items[0]["data"]
    sentence = (
        f"{method}, D in {unit} (`{items[0]['subject']}`): alpha2 = {quantity_text(head['alpha2'])}, "
        f"alpha1 = {quantity_text(head['alpha1'])}, alpha3 = {quantity_text(head['alpha3'])}: "
        f"alpha2 > alpha1 > alpha3 {head['verdict']}; unit-free alpha2 - alpha1 = {quantity_text(head['alpha2_minus_alpha1'])}"
    )
    if len(items) > 1:
        held = sum(item["data"]["holds"] for item in items[1:])
        sentence += f"; at the estimate it holds in {held} of {len(items) - 1} other laws"
    return _item("ordering", method, sentence + ".", {"token_unit": unit, "fits": [i["subject"] for i in items]}, True)


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
    verdict = "favours the interaction" if delta > 2 else "favours no interaction" if delta < -2 else "undecided"
    held = ", ".join(f"held-out gain at the largest {v.upper()} {fmt(b - m)} nats" for v, (b, m) in gains.items())
    sentence = f"`{fit.key}` against `{base.key}`: ΔAICc = {fmt(delta)} {verdict}" + (f"; {held}." if held else ".")
    return _item("comparison", fit.key, sentence, {"delta_aicc": delta, "held_out": gains, "verdict": verdict})


def _comparison_line(method: str, items: list[dict], keys: dict[str, FitKey]) -> dict:
    parts = [
        f"{_label(keys[item['subject']])} {fmt(item['data']['delta_aicc'])} ({item['data']['verdict']})"
        for item in items
    ]
    gains = items[0]["data"]["held_out"]
    held = ", ".join(f"largest {v.upper()} {fmt(b - m)}" for v, (b, m) in gains.items())
    sentence = (
        f"{method}: ΔAICc (no interaction minus interaction; > 2 favours it) "
        + "; ".join(parts)
        + (f"; held-out RMSE gain of the {_label(keys[items[0]['subject']])} law: {held} nats" if held else "")
        + "."
    )
    return _item("comparison", method, sentence, {"fits": [item["subject"] for item in items]}, True)


def _break_even(rows: list[dict]) -> list[dict]:
    out = []
    for row in rows:
        how = "dense cost counted" if row["count_sunk_cost"] else "dense cost sunk"
        sentence = (
            f"`{row['upcycled_fit']}` against `{row['scratch_fit']}`, size {row['size']}, D1 = {fmt(row['d1'])}, "
            f"{how}: D2* = {fmt(row['d2_star'])} {interval_text(row['d2_star_interval'])}, {row['verdict']}."
        )
        out.append(_item("break_even", row["upcycled_fit"], sentence, {"row": row}))
    conclusive = sum(row["conclusive"] for row in rows)
    if rows:
        out.append(
            _item(
                "break_even",
                "all",
                f"D2* is conclusive in {conclusive} of {len(rows)} (law, size, D1, accounting) cases "
                "(the tables above: one law per size; every law and crossing: guidance.json).",
                {"conclusive": conclusive, "cases": len(rows)},
                True,
            )
        )
    return out


def _model_config(fits: FitSet) -> list[dict]:
    out = []
    for _, fit in fits.select(["model_config"]):
        if not fit.ok:
            sentence = f"`{fit.key}` was not fitted: {fit.reason}"
        else:
            p = fit.params
            sentence = (
                f"`{fit.key}` (D1 = {fmt(fit.context.get('d1_tokens'))}, D2 = {fmt(fit.context.get('d2_tokens'))}, "
                f"{fit.n_points} runs): beta1 (sparsity P) = {fmt(p['beta1'])} {interval_text(fit.interval.get('beta1'))}, "
                f"beta2 (active parameters N2) = {fmt(p['beta2'])} {interval_text(fit.interval.get('beta2'))}, "
                f"E = {fmt(p['E'])}; status {fit.status}."
            )
        out.append(_item("model_config", fit.key, sentence, {"status": fit.status}, True))
    return out


def _across_methods(by_method: dict[str, list[tuple[FitKey, FitResult]]]) -> list[dict]:
    """One sentence ranking the methods by alpha3 (the first law of each: joint when fitted)."""
    if len(by_method) < 2:
        return []
    ranked = sorted(
        ((m, members[0][1]) for m, members in by_method.items()), key=lambda item: -item[1].params["alpha3"]
    )
    text = ""
    for index, (method, fit) in enumerate(ranked):
        if index:
            above = invariant(ranked[index - 1][1], "alpha3")["interval"][0]
            text += " > " if above > invariant(fit, "alpha3")["interval"][1] else " ~ "
        text += f"{method} {quantity_text(invariant(fit, 'alpha3'))}"
    open_ = [m for m, fit in ranked if not alpha3_identified(fit)[0]]
    sentence = (
        f"Saturation alpha3 by method (`{ranked[0][1].law}` laws), largest first: {text} ('>': the "
        "95% intervals separate them; '~': they overlap)"
        + (f"; not identified for {', '.join(open_)}: no order claimed there" if open_ else "")
        + "."
    )
    return [_item("methods", "all", sentence, {m: f.params["alpha3"] for m, f in ranked}, True)]


def _methods(fits: FitSet, by_method: dict[str, list[tuple[FitKey, FitResult]]]) -> list[dict]:
    out = _across_methods(by_method)
    for method, members in by_method.items():
        for index, (key, fit) in enumerate(members):
            match = fits.scratch_for(key)
            scratch = match[1] if match is not None else None
            d1_max = max(fit.context.get("d1_values") or [math.nan])
            gamma = fit.params["alpha2"] - fit.params["alpha3"] * math.log(d1_max)
            text = f"`{fit.key}` ({method}): effective D2 exponent alpha2 - alpha3 ln D1 = {fmt(gamma)} at the largest D1 ({fmt(d1_max)})"
            if scratch is not None:
                beta = scratch.params["beta"]
                text += (
                    f", against beta = {fmt(beta)} {interval_text(scratch.interval.get('beta'))} of `{scratch.key}` "
                    f"trained from scratch ({'slower' if gamma < beta else 'faster'} than from scratch)"
                )
            else:
                text += "; no from-scratch law of this method to compare with"
            data = {
                "method": method,
                "effective_exponent": gamma,
                "scratch_beta": scratch.params["beta"] if scratch else None,
            }
            out.append(_item("methods", fit.key, text + ".", data, summary=index == 0))
    return out


def _irreducible(fits: FitSet) -> list[dict]:
    """One line where the E-handling option is not ``free`` (or was asked for and fell back)."""
    upcycled = [fit for _, fit in fits.select(COMPARED_LAWS, fitted=True)]
    options = sorted({option for fit in upcycled if (option := irreducible_option(fit)) not in (None, "free")})
    notes = sorted({str(fit.context["irreducible_note"]) for fit in upcycled if fit.context.get("irreducible_note")})
    if not options and not notes:
        return []
    sentence = "E handling: " + "; ".join(
        [
            *(
                f"fit.irreducible = {option}: the dataset and joint laws' E is held at the dense (Chinchilla) fit's "
                "E on the same tokens, not fitted (a reported choice, for sweeps that cannot separate E from the "
                "power terms)"
                for option in options
            ),
            *notes,
        ]
    )
    return [_item("health", "irreducible", sentence + ".", {"irreducible": options, "notes": notes}, True)]


def findings(fits: FitSet, guidance: list[dict]) -> list[dict]:
    """Every finding of the report, in ``TOPICS`` order (see the module docstring)."""
    by_method = _by_method(fits)
    unit = token_unit(fits)
    keys = {str(key): key for key, _ in _upcycled_fits(fits)}
    out: list[dict] = []
    for method, members in by_method.items():
        out.append(_interaction_line(method, members))
        out += [_interaction(fit) for _, fit in members]
    if by_method:
        sentence = (
            f"Token unit: D in {unit} (fit.token_unit) wherever alpha1 or alpha2 is stated; they shift by "
            "alpha3 ln u under D -> D/u, alpha3 and alpha2 - alpha1 do not."
        )
        out.append(_item("ordering", "token_unit", sentence, {"token_unit": unit}, True))
    for method, members in by_method.items():
        items = [_ordering(fit, unit) for _, fit in members]
        out += [_ordering_line(method, items, unit), *items]
    for method, members in by_method.items():
        items = [entry for key, fit in members if (entry := _comparison(fits, key, fit)) is not None]
        if items:
            out += [_comparison_line(method, items, keys), *items]
    out += _break_even(guidance)
    out += _model_config(fits)
    out += _methods(fits, by_method)
    out += _irreducible(fits) + health_findings(fits)
    return out
