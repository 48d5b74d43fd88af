"""The report (``upcycling report``): ``summary.md`` that opens with the findings, then the
tables; ``findings.json``, ``guidance.json`` and the figures (:mod:`upcycling.analysis.figures`).

``write_report(ds, fits, guidance, out_dir) -> dict[str, Path]`` (``fits`` by key string, as
``load_fits`` reads them; ``guidance=None``: computed here with
:func:`upcycling.analysis.advice.compute_guidance`). The fits become one
:class:`~upcycling.analysis.fitset.FitSet`, which the guidance, the findings, the figures and the
tables all read. Every file is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
import yaml

from upcycling.analysis.advice import compute_guidance
from upcycling.analysis.figures import FIGURES, write_figures
from upcycling.analysis.findings import TOPICS, findings, fmt
from upcycling.analysis.fitresult import FitResult, to_jsonable
from upcycling.analysis.fitset import FitSet
from upcycling.analysis.fitstage import PARAMETER_COUNTS, runs_table
from upcycling.analysis.laws import LAWS
from upcycling.analysis.reinit import RatioComparison, comparisons, ratio_findings, single_ratio_note
from upcycling.core.publish import publish_json, publish_text

__all__ = ["FIGURES", "write_report"]


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
    lines += ["| " + " | ".join(_cell(cell) for cell in row) + " |" for row in rows]
    return lines + [""]


def _interval(pair) -> str:
    if not pair:
        return "n/a"
    return f"[{fmt(pair[0])}, {fmt(pair[1])}]"


def _held_out_text(fit: FitResult, variable: str) -> str:
    entry = fit.held_out.get(variable)
    if not entry:
        return "—"
    if "rmse" not in entry:
        return "skipped"
    return f"{fmt(entry['rmse'])} (n={entry['n_points']})"


def _intro(ds: xr.Dataset, table, fits: FitSet, convention: str) -> list[str]:
    counts = table.groupby(["init", "method"]).size().to_dict()
    columns = PARAMETER_COUNTS.get(convention, {})
    priors = sorted({str(fit.prior["name"]) for fit in fits.values() if fit.prior})
    return [
        "# Upcycling scaling-law report",
        "",
        f"Code version `{ds.attrs.get('code_version', 'unknown')}`. Runs: "
        + ", ".join(f"{init}/{method} {n}" for (init, method), n in sorted(counts.items()))
        + ".",
        "",
        f"Parameter counts: **{convention.replace('_', '-')}** (N1 = `{columns.get('n1_params')}`, "
        f"N2 = `{columns.get('n2_params')}`, P = `{columns.get('total_params')}` / N2), in the "
        "laws, in the compute C = 6·N·D and in the guidance alike (docs/fits.md).",
        "",
        "Fits: Huber loss (delta in each fit) on log residuals, a grid of starts, trust-region "
        "least squares and L-BFGS-B to agreement; only E >= 0 and positive amplitudes are "
        "bounded"
        + (f"; prior: {', '.join(priors)} (reported per fit)" if priors else "; no prior on the sign of any exponent")
        + ". Intervals: 95% case bootstrap (runs "
        "resampled). Held-out checks refit from the grid without the held-out runs. AICc is a "
        "Gaussian approximation at a robust fit.",
        "",
    ]


def _findings_lines(items: list[dict]) -> list[str]:
    lines = ["## Findings", ""]
    for topic, title in TOPICS.items():
        chosen = [item for item in items if item["topic"] == topic]
        if chosen:
            lines += [f"### {title}", ""] + [f"- {item['sentence']}" for item in chosen] + [""]
    return lines


def _reinit_lines(compared: list[RatioComparison], fits: FitSet) -> list[str]:
    """The re-initialisation ratios side by side, one table per size; one line for a sweep of one r."""
    if not compared:
        return [single_ratio_note(fits), ""]
    lines = [
        "## Drop-Upcycling: re-initialisation ratio",
        "",
        "Each r's dataset law against the same from-scratch law; intervals: 95% bootstrap; D2*: "
        "'inconclusive' where its interval reaches an end of the searched range (see 'When to stop upcycling').",
        "",
    ]
    for comparison in compared:
        header = ["quantity", *(f"r = {ratio:g}" for ratio in comparison.group.ratios)]
        lines += [f"### {comparison.group.title}", ""]
        lines += _table(header, [[label, *cells] for label, cells in comparison.rows])
    return lines


def _overview(fits: FitSet) -> list[str]:
    rows = [
        [f"`{key}`", fit.status, fit.n_points, fit.rmse, fit.aicc, ", ".join(fit.not_identified()) or "—"]
        for key, fit in fits.items()
        if fit.ok
    ]
    return ["## Fits at a glance", ""] + _table(
        ["fit", "status", "runs", "RMSE (nats)", "AICc", "not identified by these runs"], rows
    )


def _parameter_lines(fits: FitSet) -> list[str]:
    lines = ["## Fitted laws", ""]
    for key, fit in fits.items():
        if not fit.ok:
            continue
        lines += [
            f"### `{key}`: {fit.formula}",
            "",
            f"{fit.n_points} runs; status **{fit.status}** ({fit.status_detail}); RMSE "
            f"{fmt(fit.rmse)} nats; AICc {fmt(fit.aicc)}; BIC {fmt(fit.bic)}"
            + (
                f"; prior {fit.prior['name']!r} active on: {', '.join(fit.prior['active']) or 'none'}"
                if fit.prior
                else ""
            )
            + ".",
            "",
        ]
        rows: list[list[Any]] = []
        for name, value in fit.params.items():
            entry = fit.identification.get(name, {})
            judged = (
                "yes"
                if entry.get("identified", True)
                else f"no: {entry.get('why', '')}" + (f"; {entry['extension']}" if entry.get("extension") else "")
            )
            rows.append([name, value, fit.stderr.get(name, math.nan), _interval(fit.interval.get(name)), judged])
        lines += _table(
            [
                "parameter",
                "value",
                "std. error",
                f"bootstrap 95% (n={fit.bootstrap.get('n_samples', 0)})",
                "identified",
            ],
            rows,
        )
        notes = [note for note in (fit.stderr_note, fit.bootstrap.get("note")) if note]
        lines += [f"Notes: {'; '.join(notes)}.", ""] if notes else []
    return lines


def _baseline_lines(fits: FitSet) -> list[str]:
    lines = [
        "## Laws against their baselines",
        "",
        "Same runs in each group. ΔAICc: the row's AICc minus the main law's (> 2: the main "
        "law is better). Held-out: refit from the grid without the runs at the largest value, "
        "RMSE on them.",
        "",
    ]
    any_group = False
    for key, fit in fits.items():
        if not fit.ok or not LAWS[fit.law].baselines:
            continue
        baselines = [key.with_law(law) for law in LAWS[fit.law].baselines]
        group = [(key, fit)] + [(baseline, fits[baseline]) for baseline in baselines if baseline in fits]
        rows: list[list[Any]] = []
        for member_key, member in group:
            if not member.ok:
                rows.append([f"`{member_key}`", "skipped", "", "", "", "", ""])
                continue
            rows.append(
                [
                    f"`{member_key}`",
                    member.status,
                    member.n_params,
                    member.rmse,
                    member.aicc - fit.aicc,
                    _held_out_text(member, "d2"),
                    _held_out_text(member, "d1"),
                ]
            )
        lines += _table(
            ["law", "status", "params", "RMSE", "ΔAICc", "held-out RMSE (largest D2)", "held-out RMSE (largest D1)"],
            rows,
        )
        any_group = True
    return lines if any_group else lines + ["No law with baselines was fitted.", ""]


def _guidance_lines(guidance: list[dict]) -> list[str]:
    lines = [
        "## When to stop upcycling",
        "",
        "D2*: the second-stage tokens beyond which the same architecture trained from scratch "
        "with the same compute gives a lower loss (∞: upcycling stays better in the searched "
        "range, the runs' D2 ± a decade; 0: from scratch is better throughout). 'dense cost': "
        "6·N1·D1 added to the from-scratch budget.",
        "",
    ]
    if not guidance:
        return lines + ["No pair of fitted upcycled and from-scratch laws: no guidance.", ""]
    rows = [
        [
            f"`{row['upcycled_fit']}`",
            f"`{row['scratch_fit']}`",
            row["size"],
            row["d1"],
            "counted" if row["count_sunk_cost"] else "sunk",
            row["d2_star"],
            _interval(row["d2_star_interval"]),
            row["verdict"],
            ", ".join(f"{fmt(c['d2'])} → {c['better_after']}" for c in row["crossings"]) or "—",
            row["effective_d2_exponent"],
        ]
        for row in guidance
    ]
    return lines + _table(
        [
            "upcycled law",
            "scratch law",
            "size",
            "D1",
            "dense cost",
            "D2*",
            "95% interval",
            "verdict",
            "crossings",
            "alpha2 - alpha3 ln D1",
        ],
        rows,
    )


def _vocab_size(ds: xr.Dataset) -> int | None:
    try:
        config = yaml.safe_load(ds.attrs.get("config") or "") or {}
        return int(config["tokenizer"]["vocab_size"])
    except (yaml.YAMLError, KeyError, TypeError, ValueError):
        return None


def write_report(
    ds: xr.Dataset, fits: Mapping[str, FitResult], guidance: list[dict] | None, out_dir: str | Path
) -> dict[str, Path]:
    """Write ``summary.md`` (findings first, then the tables), ``findings.json``,
    ``guidance.json`` and the figures (``FIGURES``) into ``out_dir``."""
    fit_set = FitSet.of(fits)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    convention = next(
        (str(fit.context["parameter_counts"]) for fit in fit_set.values() if fit.context.get("parameter_counts")),
        "non_embedding",
    )
    table = runs_table(ds, convention)
    if guidance is None:
        guidance = compute_guidance(fit_set)
    compared = comparisons(fit_set, guidance, table)
    order = list(TOPICS)
    items = sorted(findings(fit_set, guidance) + ratio_findings(compared), key=lambda item: order.index(item["topic"]))
    written = write_figures(table, fit_set, out_dir, vocab_size=_vocab_size(ds))
    lines = _intro(ds, table, fit_set, convention) + _findings_lines(items) + _reinit_lines(compared, fit_set)
    lines += _overview(fit_set)
    lines += _guidance_lines(guidance) + _baseline_lines(fit_set) + _parameter_lines(fit_set)
    skipped = [[f"`{key}`", fit.reason or ""] for key, fit in fit_set.items() if not fit.ok]
    if skipped:
        lines += ["## Laws not fitted", ""] + _table(["law", "reason"], skipped)
    lines += ["## Figures", ""] + [f"![{name}]({path.name})\n" for name, path in written.items()]
    written["findings"] = publish_json(out_dir / "findings.json", to_jsonable(items))
    written["guidance"] = publish_json(out_dir / "guidance.json", to_jsonable(guidance))
    written["summary"] = publish_text(out_dir / "summary.md", "\n".join(lines))
    return written
