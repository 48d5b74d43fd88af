"""Fit health for the report, grouped by cause (pure).

``health_findings(fits: FitSet) -> list[dict]``: findings of topic ``health``. The summary
lines (``summary`` true): the statuses counted, then one line per cause naming the fits it
concerns: a parameter on a bound (by parameter and bound), a singular J^T J, optimisers that
disagree, and a parameter the runs leave open (by parameter, with the extension of the sweep
that would identify it). The detail (one item per fit and cause) goes to findings.json only.
"""

from __future__ import annotations

from upcycling.analysis.fitresult import FitResult
from upcycling.analysis.fitset import FitKey, FitSet
from upcycling.core.errors import InputError

__all__ = ["compress_keys", "health_findings"]

BASELINE_SUFFIXES = ("_no_interaction", "_additive")


def compress_keys(keys: list[str]) -> str:
    """Fit keys for one line: those differing only in size written once, ``law.method.{s,xs}.moe``."""
    groups: dict[tuple, list[str]] = {}
    for text in keys:
        try:
            key = FitKey.parse(text)
        except InputError:  # a key this version cannot parse: shown as it is
            groups.setdefault((text,), [])
            continue
        if key.size is None:
            groups.setdefault((text,), [])
        else:
            groups.setdefault((key.law, key.method, str(key.moe)), []).append(key.size)
    parts = []
    for group, sizes in groups.items():
        if len(group) == 1:
            parts.append(f"`{group[0]}`")
        else:
            law, method, moe = group
            middle = sizes[0] if len(sizes) == 1 else "{" + ",".join(sorted(sizes)) + "}"
            parts.append(f"`{law}.{method}.{middle}.{moe}`")
    return ", ".join(parts)


def _item(subject: str, sentence: str, data: dict, summary: bool) -> dict:
    return {"topic": "health", "subject": subject, "sentence": sentence, "data": data, "summary": summary}


def _bound_cause(name: str, why: str) -> str:
    return f"{name} on its bound ({why.split(':')[0].strip()})"


def health_findings(fits: FitSet) -> list[dict]:
    fitted = sorted((fit for fit in fits.values() if fit.ok), key=lambda f: f.key)
    counts = {
        status: sum(f.status == status for f in fitted)
        for status in ("converged", "at_bound", "singular", "not_converged")
    }
    skipped = [fit.key for fit in fits.values() if not fit.ok]
    out = [
        _item(
            "all",
            f"{counts['converged']} of {len(fitted)} fitted laws converged cleanly, {counts['at_bound']} end on a "
            f"bound, {counts['singular']} have a singular J^T J, {counts['not_converged']} did not converge; "
            f"{len(skipped)} not fitted" + (f" ({compress_keys(skipped)})." if skipped else "."),
            {**counts, "skipped": skipped},
            True,
        )
    ]
    causes: dict[str, list[tuple[FitResult, str]]] = {}
    for fit in fitted:
        for name, why in fit.at_bound.items():
            entry = fit.identification.get(name, {})
            hint = entry.get("extension") or entry.get("extension_note") or ""
            causes.setdefault(_bound_cause(name, why), []).append((fit, hint))
        if fit.status in ("singular", "not_converged"):
            label = "singular J^T J" if fit.status == "singular" else "the two optimisers disagree"
            causes.setdefault(label, []).append((fit, fit.status_detail))
        for name in fit.not_identified():
            if name in fit.at_bound:
                continue
            entry = fit.identification[name]
            hint = entry.get("extension") or entry.get("extension_note") or ""
            causes.setdefault(f"{name} not identified by these runs", []).append((fit, hint))
    for cause, members in causes.items():
        for fit, detail in members:
            out.append(_item(fit.key, f"`{fit.key}`: {cause}: {detail}.", {"cause": cause, "detail": detail}, False))
        main = [(f, d) for f, d in members if not f.law.endswith(BASELINE_SUFFIXES)]
        baselines = [f.key for f, d in members if f.law.endswith(BASELINE_SUFFIXES)]
        texts = []
        if "not identified" in cause or "on its bound" in cause:
            by_hint: dict[str, list[str]] = {}
            for fit, hint in main:
                by_hint.setdefault(hint, []).append(fit.key)
            texts = [f"{compress_keys(keys)}" + (f" ({hint})" if hint else "") for hint, keys in by_hint.items()]
        elif main:
            texts = [compress_keys([f.key for f, _ in main])]
        if baselines:
            texts.append(f"baselines {compress_keys(baselines)}")
        sentence = f"{cause}: " + "; ".join(texts) + "."
        out.append(_item("cause", sentence, {"cause": cause, "fits": [f.key for f, _ in members]}, True))
    return out
