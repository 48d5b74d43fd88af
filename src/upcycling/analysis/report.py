"""The report (``upcycling report``): ``summary.md`` that answers first, ``summary.html`` (the same
text for ``snakemake --report``), ``findings.json``, ``guidance.json`` and the figures
(:mod:`upcycling.analysis.figures`).

``write_report(ds, fits, guidance, out_dir) -> dict[str, Path]`` (``fits`` by key string, as
``load_fits`` reads them; ``guidance=None``: computed here with
:func:`upcycling.analysis.advice.compute_guidance`). The fits become one
:class:`~upcycling.analysis.fitset.FitSet`, which the guidance, the findings, the figures and the
tables all read.

``summary.md``, in this order: the answer (one table per dense size: upcycle or train from
scratch, D2* per D1 under both compute accountings, :mod:`upcycling.analysis.headline`), the
break-even figure, the findings (one line per method and topic, fit health one line per
cause), then "## Details": the runs and fit settings, every other law's D2*, one row per fitted
law with its parameters, the laws against their baselines, the laws not fitted and the other
figures. Everything else (per-fit findings, every crossing) is in findings.json and
guidance.json. Every file is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr
import yaml

from upcycling.analysis.advice import compute_guidance
from upcycling.analysis.figures import FIGURES, write_figures
from upcycling.analysis.findings import TOPICS, findings
from upcycling.analysis.fitresult import FitResult, to_jsonable
from upcycling.analysis.fitset import FitKey, FitSet
from upcycling.analysis.fitstage import PARAMETER_COUNTS, runs_table
from upcycling.analysis.headline import answer_cell, answer_lines, answer_tables, preferred_pairs, tokens_text
from upcycling.analysis.health import BASELINE_SUFFIXES
from upcycling.analysis.htmlpage import markdown_to_html
from upcycling.analysis.laws import LAWS
from upcycling.analysis.reinit import RatioComparison, comparisons, ratio_findings, single_ratio_note
from upcycling.analysis.units import fmt, token_unit
from upcycling.core.publish import publish_json, publish_text

__all__ = ["FIGURES", "Composed", "compose", "summary_lines", "write_report"]


def _cell(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return fmt(value, 4)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_cell(cell) for cell in row) + " |" for row in rows] + [""]


def _findings_lines(items: list[dict]) -> list[str]:
    lines, topic = ["## Findings", ""], None
    for item in items:
        if item.get("summary"):
            title = f"**{TOPICS[item['topic']]}.** " if item["topic"] != topic else ""
            lines.append(f"- {title}{item['sentence']}")
            topic = item["topic"]
    return lines + [""]


def _settings(ds: xr.Dataset, table, fits: FitSet, convention: str) -> list[str]:
    counts = table.groupby(["init", "method"]).size().to_dict()
    columns = PARAMETER_COUNTS.get(convention, {})
    priors = sorted({str(fit.prior["name"]) for fit in fits.values() if fit.prior})
    deltas = sorted({fit.huber_delta for fit in fits.values() if fit.ok})
    return [
        f"Code version `{ds.attrs.get('code_version', 'unknown')}`. Runs: "
        + ", ".join(f"{init}/{method} {n}" for (init, method), n in sorted(counts.items()))
        + f". Parameter counts: **{convention.replace('_', '-')}** (N1 = `{columns.get('n1_params')}`, "
        f"N2 = `{columns.get('n2_params')}`, P = `{columns.get('total_params')}` / N2) in the laws, the compute "
        f"and the guidance. Token unit of the stated exponents: {token_unit(fits)}.",
        "",
        f"Fits: Huber loss (delta {', '.join(fmt(d) for d in deltas) or 'n/a'}) on log residuals, a grid of starts, "
        "trust-region least squares and L-BFGS-B to agreement; only E >= 0 and positive amplitudes are bounded"
        + (f"; prior: {', '.join(priors)}" if priors else "; no prior on the sign of any exponent")
        + ". Parameter intervals: 95%, as each fit records them (docs/fits.md); D2* intervals: case bootstrap. "
        "Held-out checks refit without the held-out runs; AICc is a Gaussian approximation at a robust fit.",
        "",
    ]


def _reinit_lines(compared: list[RatioComparison]) -> list[str]:
    """The re-initialisation ratios side by side: one table per size (the dataset law), then one
    per joint law across the sizes (its D2* rows name the size)."""
    lines = [
        "### Drop-Upcycling: re-initialisation ratio",
        "",
        "Each r's dataset law (per size) and joint law (across sizes, where fitted) against the same "
        "from-scratch law; D2*: 'inconclusive' where its interval reaches an end of the searched range.",
        "",
    ]
    for comparison in compared:
        header = ["quantity", *(f"r = {ratio:g}" for ratio in comparison.group.ratios)]
        lines += [f"#### {comparison.group.title}", ""]
        lines += _table(header, [[label, *cells] for label, cells in comparison.rows])
    return lines


def _other_d2_star(fits: FitSet, guidance: list[dict]) -> list[str]:
    """D2* of the laws the opening tables do not show (the per-size dataset law beside the joint one)."""
    chosen = preferred_pairs(fits, guidance)
    others = [
        r for r in guidance if chosen[(r["method"], r["moe"], r["size"])] != (r["upcycled_fit"], r["scratch_fit"])
    ]
    if not others:
        return []
    cells: dict[tuple, dict[bool, str]] = {}
    for row in others:
        up, scratch = (fits.fitted(FitKey.parse(row[name])) for name in ("upcycled_fit", "scratch_fit"))
        group = (row["upcycled_fit"], row["scratch_fit"], row["size"], row["d1"])
        cells.setdefault(group, {})[row["count_sunk_cost"]] = answer_cell(row, up, scratch)
    rows = [
        [f"`{up}` vs `{scratch}`", size, tokens_text(d1), by.get(False, "—"), by.get(True, "—")]
        for (up, scratch, size, d1), by in cells.items()
    ]
    return ["### D2* of the other laws", ""] + _table(
        ["laws", "size", "D1", "dense cost sunk", "dense cost counted"], rows
    )


def _parameters_text(fit: FitResult) -> str:
    parts = []
    for name, value in fit.params.items():
        low, high = fit.interval.get(name) or [math.nan, math.nan]
        mark = "" if fit.identification.get(name, {}).get("identified", True) else "*"
        if name in (getattr(fit, "held", None) or {}):
            mark = " (held)"
        parts.append(f"{name} {fmt(value)} [{fmt(low)}, {fmt(high)}]{mark}")
    return ", ".join(parts)


def _baselines_text(fits: FitSet, key: FitKey, fit: FitResult) -> str:
    """Each baseline's AICc minus the law's (> 2: the law is better) and the held-out RMSEs,
    law / baseline, refitted without the runs at the largest D2 and the largest D1."""
    parts = []
    for law in LAWS[fit.law].baselines:
        base = fits.get(key.with_law(law))
        if base is None or not base.ok:
            parts.append(f"{law} not fitted")
            continue
        held = ", ".join(
            f"{v.upper()} {_held_out_text(fit, v)} / {_held_out_text(base, v)}"
            for v in ("d2", "d1")
            if v in fit.held_out
        )
        parts.append(f"{law} ΔAICc {fmt(base.aicc - fit.aicc)}" + (f", held-out {held}" if held else ""))
    return "; ".join(parts) or "—"


def _held_out_text(fit: FitResult, variable: str) -> str:
    entry = fit.held_out.get(variable)
    return "—" if not entry else fmt(entry["rmse"]) if "rmse" in entry else "skipped"


def _fits_lines(fits: FitSet) -> list[str]:
    rows = [
        [f"`{key}`", fit.status, fit.n_points, fit.rmse, _baselines_text(fits, key, fit), _parameters_text(fit)]
        for key, fit in fits.items()
        if fit.ok and not fit.law.endswith(BASELINE_SUFFIXES)
    ]
    intro = (
        "Raw-token parameters, 95% intervals; * not identified by these runs (why, and the runs that would: "
        "findings.json). Baselines: their AICc minus the law's (> 2: the law is better), held-out RMSE (nats) "
        "law / baseline, refitted without the runs at the largest D2 or D1; their parameters: results/fits/."
    )
    header = ["law", "status", "runs", "RMSE (nats)", "against its baselines", "parameters"]
    return ["### Fitted laws", "", intro, ""] + _table(header, rows)


def _convention(fits: FitSet) -> str:
    return next(
        (str(fit.context["parameter_counts"]) for fit in fits.values() if fit.context.get("parameter_counts")),
        "non_embedding",
    )


def _vocab_size(ds: xr.Dataset) -> int | None:
    try:
        config = yaml.safe_load(ds.attrs.get("config") or "") or {}
        return int(config["tokenizer"]["vocab_size"])
    except (yaml.YAMLError, KeyError, TypeError, ValueError):
        return None


def summary_lines(
    ds: xr.Dataset, table, fits: FitSet, guidance: list[dict], items: list[dict], compared, figures: Mapping[str, Path]
) -> list[str]:
    """The lines of ``summary.md`` (see the module docstring)."""
    convention = _convention(fits)
    break_even = figures.get("break_even")
    lines = ["# Upcycling scaling-law report", ""]
    lines += answer_lines(answer_tables(fits, guidance), break_even.name if break_even else None)
    lines += _findings_lines(items)
    lines += ["## Details", ""] + _settings(ds, table, fits, convention)
    lines += _reinit_lines(compared) if compared else [single_ratio_note(fits), ""]
    lines += _other_d2_star(fits, guidance) + _fits_lines(fits)
    skipped = [[f"`{key}`", fit.reason or ""] for key, fit in fits.items() if not fit.ok]
    if skipped:
        lines += ["### Laws not fitted", ""] + _table(["law", "reason"], skipped)
    lines += ["### Figures", ""]
    lines += [" ".join(f"![{name}]({path.name})" for name, path in figures.items() if name != "break_even"), ""]
    return lines


@dataclass(frozen=True)
class Composed:
    """What the report writes, before it is written: summary lines, findings and guidance, and the
    fit set and runs table they were made from (the figures draw the same ones)."""

    lines: list[str]
    findings: list[dict]
    guidance: list[dict]
    fit_set: FitSet
    table: pd.DataFrame


def compose(ds: xr.Dataset, fits: Mapping[str, FitResult], guidance: list[dict] | None = None) -> Composed:
    """The summary's lines, the findings and the guidance (figures named, not drawn)."""
    fit_set = FitSet.of(fits)
    table = runs_table(ds, _convention(fit_set))
    if guidance is None:
        guidance = compute_guidance(fit_set)
    compared = comparisons(fit_set, guidance, table)
    order = list(TOPICS)
    items = findings(fit_set, guidance) + [{**item, "summary": True} for item in ratio_findings(compared)]
    items.sort(key=lambda item: order.index(item["topic"]))  # stable: each topic keeps its order
    unit = token_unit(fit_set)
    items = [{**item, "token_unit": unit} for item in items]  # alpha1 and alpha2 mean something only in it
    figures = {name: Path(filename) for name, filename in FIGURES.items()}
    lines = summary_lines(ds, table, fit_set, guidance, items, compared, figures)
    return Composed(lines, items, guidance, fit_set, table)


def write_report(
    ds: xr.Dataset, fits: Mapping[str, FitResult], guidance: list[dict] | None, out_dir: str | Path
) -> dict[str, Path]:
    """Write ``summary.md`` (the answer first), ``summary.html``, ``findings.json``,
    ``guidance.json`` and the figures (``FIGURES``) into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    composed = compose(ds, fits, guidance)
    written = write_figures(composed.table, composed.fit_set, out_dir, vocab_size=_vocab_size(ds))
    text = "\n".join(composed.lines)
    written["findings"] = publish_json(out_dir / "findings.json", to_jsonable(composed.findings))
    written["guidance"] = publish_json(out_dir / "guidance.json", to_jsonable(composed.guidance))
    written["summary_html"] = publish_text(out_dir / "summary.html", markdown_to_html(text))
    written["summary"] = publish_text(out_dir / "summary.md", text)
    return written
