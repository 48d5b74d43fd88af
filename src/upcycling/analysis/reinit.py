"""Drop-Upcycling's re-initialisation ratio r: the variants of one sweep side by side (pure).

Each r's dataset law is fitted per dense size, and its joint law across the sizes, against the
same from-scratch fit (:meth:`~upcycling.analysis.fitset.FitSet.scratch_for`); this module lines
them up:

- ``ratio_groups(fits, laws=("dataset",)) -> list[RatioGroup]``: per law, method, dense size
  (the dataset law; None for the joint law) and architecture run at more than one r, the key of
  each r (empty: the sweep has one r)
- ``single_ratio_note(fits) -> str``: the one line the report gives a sweep of one r
- ``comparisons(fits, guidance, table=None) -> list[RatioComparison]``: per group of the dataset
  and the joint law (a joint group none of whose r was fitted, e.g. fewer than 3 sizes, is left
  out), one row per quantity and one cell per r: alpha3 with its profile interval, the
  effective D2 exponent alpha2 - alpha3 ln D1 at the largest D1 with its bootstrap interval, D2*
  per D1 (the joint law: per size and D1) and compute accounting with its interval (or
  "inconclusive"), and for the dataset law (when the runs table has them) the experts' mean
  weight similarity and largest load share
- ``ratio_findings(comparisons) -> list[dict]``: the findings of topic ``reinit_ratio``
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from upcycling.analysis.findings import fmt
from upcycling.analysis.fitresult import FitResult
from upcycling.analysis.fitset import COMPARED_LAWS, FitKey, FitSet, MoeVariant

__all__ = ["RatioComparison", "RatioGroup", "comparisons", "ratio_findings", "ratio_groups", "single_ratio_note"]

# the runs table's record of what the experts do -> its row label
_EXPERT_ROWS = {
    "expert_similarity": "experts' mean pairwise weight similarity (mean over runs)",
    "expert_load_max": "largest share of tokens an expert got (mean over runs)",
}


@dataclass(frozen=True)
class RatioGroup:
    """The fits of one law of one method, dense size (None: the joint law, across sizes) and
    architecture, one per r (ascending)."""

    method: str
    size: str | None
    architecture: MoeVariant
    keys: tuple[FitKey, ...]
    law: str = "dataset"

    @property
    def ratios(self) -> tuple[float, ...]:
        return tuple(_ratio(key) for key in self.keys)

    @property
    def title(self) -> str:
        where = "joint law across sizes" if self.size is None else f"size {self.size}"
        return f"{self.method}, {where}, {self.architecture}"

    @property
    def subject(self) -> str:
        """The finding's subject: ``<method>.<size>.<moe>``, or ``joint.<method>.<moe>``."""
        if self.size is None:
            return str(FitKey(self.law, self.method, moe=self.architecture))
        return f"{self.method}.{self.size}.{self.architecture}"


@dataclass(frozen=True)
class RatioComparison:
    """One group's quantities side by side: ``rows`` of (label, one cell per r); ``data``: the
    numbers behind them, by r (as ``str(r)``), for findings.json."""

    group: RatioGroup
    rows: tuple[tuple[str, tuple[str, ...]], ...]
    data: dict[str, dict[str, Any]]


def _ratio(key: FitKey) -> float:
    return 0.0 if key.moe is None else key.moe.reinit_ratio


def _ratios(fits: FitSet) -> list[float]:
    return sorted({key.moe.reinit_ratio for key in fits if key.law in COMPARED_LAWS and key.moe is not None})


def ratio_groups(fits: FitSet, laws: tuple[str, ...] = ("dataset",)) -> list[RatioGroup]:
    """Every (law, method, size, architecture) whose law (of ``laws``: the dataset law and/or the
    joint law, which has no size) was planned at more than one r; the dataset law's groups first."""
    by_group: dict[tuple[str, str, str | None, MoeVariant], list[FitKey]] = {}
    for key, _ in fits.select(laws):
        if key.moe is not None and key.method is not None and (key.size is not None or key.law == "joint"):
            by_group.setdefault((key.law, key.method, key.size, key.moe.architecture), []).append(key)
    return [
        RatioGroup(method, size, architecture, tuple(sorted(keys, key=_ratio)), law)
        for (law, method, size, architecture), keys in sorted(by_group.items(), key=lambda item: str(item[0]))
        if len(keys) > 1
    ]


def single_ratio_note(fits: FitSet) -> str:
    ratio = (_ratios(fits) or [0.0])[0]
    return f"The sweep has one re-initialisation ratio (r = {ratio:g}): no comparison across r."


def _with_interval(value: float, interval) -> str:
    low, high = interval if interval is not None and len(interval) == 2 else (math.nan, math.nan)
    return f"{fmt(value)} [{fmt(low)}, {fmt(high)}]"


def _effective_exponent(fit: FitResult) -> tuple[float, float, list[float]]:
    """alpha2 - alpha3 ln D1 at the largest D1 of the fit, with its bootstrap 95% interval."""
    d1_max = max(fit.context.get("d1_values") or fit.data_range["d1"])
    gamma = fit.params["alpha2"] - fit.params["alpha3"] * math.log(d1_max)
    samples = fit.bootstrap.get("samples") or {}
    if not samples.get("alpha2"):
        return d1_max, gamma, [math.nan, math.nan]
    values = np.asarray(samples["alpha2"], dtype=float) - np.asarray(samples["alpha3"], dtype=float) * math.log(d1_max)
    low, high = np.nanpercentile(values, [2.5, 97.5])
    return d1_max, gamma, [float(low), float(high)]


def _d2_star_cell(row: dict | None) -> str:
    if row is None:
        return "n/a"
    if not row["conclusive"]:
        return "inconclusive"
    return _with_interval(row["d2_star"], row["d2_star_interval"])


def _expert_rows(group: RatioGroup, table: pd.DataFrame | None) -> list[tuple[str, tuple[str, ...]]]:
    """The experts' record per r, mean over the group's upcycled runs (absent from the table: none)."""
    if table is None or group.size is None:
        return []
    architecture = group.architecture
    runs = table[
        (table["init"] == "upcycled")
        & (table["method"] == group.method)
        & (table["size"] == group.size)
        & (table["experts"] == architecture.experts)
        & (table["top_k"] == architecture.top_k)
        & (table["granularity"] == architecture.granularity)
    ]
    rows = []
    for column, label in _EXPERT_ROWS.items():
        if column in runs and np.isfinite(runs[column]).any():
            means = [runs.loc[runs["reinit_ratio"] == ratio, column].mean() for ratio in group.ratios]
            rows.append((label, tuple(fmt(mean) for mean in means)))
    return rows


def _sizes(fitted: list[FitResult | None], size: str | None) -> list[str]:
    """The dense sizes D2* is given at: the dataset law's own; the joint law's, smallest N1 first."""
    if size is not None:
        return [size]
    n1 = {name: counts["n1"] for fit in fitted if fit is not None for name, counts in fit.context["sizes"].items()}
    return sorted(n1, key=lambda name: (n1[name], name))


def _fit_cells(
    key: FitKey, fit: FitResult, sizes: list[str], d1_values: list[float], guidance_rows: dict[tuple, dict]
) -> tuple[dict[str, str], dict[str, Any]]:
    """One fitted r's cells (row label -> cell) and the numbers behind them; ``sizes``: those
    its D2* is given at (a joint law's rows name the size)."""
    d1_max, gamma, gamma_interval = _effective_exponent(fit)
    alpha3 = fit.params["alpha3"]
    cells = {
        "alpha3 (95% profile interval)": _with_interval(alpha3, fit.interval.get("alpha3")),
        f"alpha2 - alpha3 ln D1 at the largest D1 ({fmt(d1_max)}; 95% bootstrap)": _with_interval(
            gamma, gamma_interval
        ),
    }
    d2_star = []
    for size in sizes:
        where = f"size {size}, " if key.law == "joint" else ""
        for d1 in d1_values:
            for counted in (False, True):
                row = guidance_rows.get((str(key), size, d1, counted))
                how = "dense cost counted" if counted else "dense cost sunk"
                cells[f"D2* at {where}D1 = {fmt(d1)} ({how})"] = _d2_star_cell(row)
                if row is not None:
                    d2_star.append(
                        {
                            "size": size,
                            "d1": d1,
                            "count_sunk_cost": counted,
                            "d2_star": row["d2_star"],
                            "interval": row["d2_star_interval"],
                            "conclusive": row["conclusive"],
                        }
                    )
    data = {
        "fit": str(key),
        "fitted": True,
        "alpha3": alpha3,
        "alpha3_interval": list(fit.interval.get("alpha3", [math.nan, math.nan])),
        "d1_max": d1_max,
        "effective_d2_exponent": gamma,
        "effective_d2_exponent_interval": gamma_interval,
        "d2_star": d2_star,
    }
    return cells, data


def comparisons(fits: FitSet, guidance: list[dict], table: pd.DataFrame | None = None) -> list[RatioComparison]:
    """Each group's quantities side by side (see the module docstring), the dataset law's groups
    first; an r whose law was not fitted reads "not fitted" in every cell."""
    guidance_rows = {(row["upcycled_fit"], row["size"], row["d1"], row["count_sunk_cost"]): row for row in guidance}
    out = []
    for group in ratio_groups(fits, COMPARED_LAWS):
        fitted = [fits.fitted(key) for key in group.keys]
        if group.size is None and not any(fitted):
            continue  # a joint law fitted at no r (e.g. fewer than 3 sizes): the fit table says why
        d1_values = sorted({float(d1) for fit in fitted if fit is not None for d1 in fit.context.get("d1_values", [])})
        sizes = _sizes(fitted, group.size)
        labels: dict[str, None] = {}  # every row label, in order of first appearance
        by_fit: list[dict[str, str] | None] = []
        data: dict[str, dict[str, Any]] = {}
        for key, fit in zip(group.keys, fitted):
            if fit is None:
                data[f"{_ratio(key):g}"] = {"fit": str(key), "fitted": False}
                by_fit.append(None)
                continue
            cells, data[f"{_ratio(key):g}"] = _fit_cells(key, fit, sizes, d1_values, guidance_rows)
            labels.update(dict.fromkeys(cells))
            by_fit.append(cells)
        rows = [
            (label, tuple("not fitted" if cells is None else cells.get(label, "n/a") for cells in by_fit))
            for label in labels
        ]
        out.append(RatioComparison(group, tuple(rows + _expert_rows(group, table)), data))
    return out


def _overlap(intervals: list[list[float]]) -> bool:
    """Whether every pair of the intervals overlaps (or one is unknown)."""
    known = [pair for pair in intervals if all(np.isfinite(pair))]
    return all(a[0] <= b[1] and b[0] <= a[1] for a in known for b in known)


def ratio_findings(compared: list[RatioComparison]) -> list[dict]:
    """One finding per group (law, method, size, architecture): alpha3 and the effective D2
    exponent at every r."""
    out = []
    for comparison in compared:
        fitted = {ratio: entry for ratio, entry in comparison.data.items() if entry["fitted"]}
        parts = [
            f"r = {ratio}: alpha3 = {_with_interval(entry['alpha3'], entry['alpha3_interval'])}, "
            "effective D2 exponent = "
            f"{_with_interval(entry['effective_d2_exponent'], entry['effective_d2_exponent_interval'])}"
            f" at the largest D1 ({fmt(entry['d1_max'])})"
            for ratio, entry in fitted.items()
        ]
        separate = not _overlap([entry["alpha3_interval"] for entry in fitted.values()])
        verdict = (
            "fewer than two r values have a fitted law: nothing to compare"
            if len(fitted) < 2
            else "the alpha3 intervals separate some r values"
            if separate
            else "the alpha3 intervals overlap: these runs do not separate the r values"
        )
        missing = [f"r = {ratio}" for ratio, entry in comparison.data.items() if not entry["fitted"]]
        group = comparison.group
        sentence = (
            f"{group.title} ({group.law} law; alpha3: 95% profile interval, effective exponent: 95% bootstrap): "
            + "; ".join([*parts, verdict])
        )
        sentence += f" ({', '.join(missing)} not fitted)." if missing else "."
        out.append(
            {
                "topic": "reinit_ratio",
                "subject": group.subject,
                "sentence": sentence,
                "data": {"law": group.law, "by_ratio": comparison.data, "alpha3_separated": separate},
            }
        )
    return out
