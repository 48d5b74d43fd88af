"""Fit every law the results store supports, and report: tables, figures, planning.

Public functions:

- ``plan_fits(table) -> list[FitTask]``: which law to fit to which runs (pure)
- ``fit_all(ds, fit_cfg, out_dir="results/fits") -> dict[str, FitResult]``: fit every planned
  law (those without enough data are kept as skipped results with the reason) and write
  ``<out_dir>/<key>.json`` for each; ``out_dir=None`` writes nothing
- ``load_fits(fits_dir) -> dict[str, FitResult]``
- ``compute_guidance(fits, d1_values=None, d2_range=DEFAULT_D2_RANGE) -> list[dict]``: the
  break-even table of every fitted upcycled law against its from-scratch counterpart
- ``write_report(ds, fits, guidance, out_dir) -> dict[str, Path]``: ``summary.md``,
  ``guidance.json`` and the PNG figures (fixed names, see ``FIGURES``)
- ``predict(fits, n1, d1, d2, experts, top_k, granularity=1, *, n2=None,
  count_sunk_cost=False, level=0.95) -> dict``: predicted loss with a bootstrap interval and
  the recommendation (upcycle or train from scratch), for the planning CLI

Fit keys: ``<law>.<size>.<moe>`` for laws of one dense size (``dataset``, its baselines,
``scratch_power``), ``<law>.<moe>`` for laws across sizes (``joint``,
``joint_no_interaction``, ``chinchilla_scratch``), and ``model_config``, ``chinchilla_dense``;
``<moe>`` is ``e<experts>k<top_k>g<granularity>``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr
from matplotlib.figure import Figure
from matplotlib.ticker import LogLocator, NullFormatter

from upcycling import guidance as guide
from upcycling.fitting import DEFAULT_HUBER_DELTA, FitResult, fit_law, to_jsonable
from upcycling.laws import LAWS, get_law
from upcycling.results import law_data, moe_label, runs_table, select_runs

log = logging.getLogger(__name__)

__all__ = [
    "FIGURES",
    "FitTask",
    "compute_guidance",
    "fit_all",
    "load_fits",
    "plan_fits",
    "predict",
    "write_report",
]

FIGURES = {
    "loss_vs_d2": "loss_vs_d2.png",
    "residuals": "residuals.png",
    "effective_exponent": "effective_exponent.png",
    "break_even": "break_even.png",
    "equal_compute": "equal_compute.png",
}
DATASET_FAMILY = ("dataset", "dataset_no_interaction", "dataset_additive")
JOINT_FAMILY = ("joint", "joint_no_interaction")


# --------------------------------------------------------------------------------------------
# Planning and running the fits
# --------------------------------------------------------------------------------------------


@dataclass
class FitTask:
    key: str
    law: str
    rows: pd.DataFrame = field(repr=False)
    context: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None  # set when there is nothing to fit at all


def _size_table(rows: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Per dense size: N1 (dense params), N2 (active params), total params of these runs."""
    sizes = {}
    for size, group in rows.groupby("size"):
        sizes[str(size)] = {
            "n1": float(group["dense_params"].median()),
            "n2": float(group["active_params"].median()),
            "n_total": float(group["n_params"].median()),
        }
    return sizes


def _context(rows: pd.DataFrame, **extra) -> dict[str, Any]:
    return {
        **extra,
        "sizes": _size_table(rows),
        "d1_values": sorted(float(v) for v in rows["d1_tokens"].unique()),
        "d2_values": sorted(float(v) for v in rows["d2_tokens"].unique()),
        "n_runs": int(len(rows)),
    }


def _moe_configs(rows: pd.DataFrame) -> list[tuple[int, int, int]]:
    return sorted({(int(e), int(k), int(g)) for e, k, g in
                   rows[["experts", "top_k", "granularity"]].itertuples(index=False)})


def plan_fits(table: pd.DataFrame) -> list[FitTask]:
    """Every (law, runs) pair the study defines, from the tidy runs table."""
    tasks: list[FitTask] = []
    upcycled = table[table["init"] == "upcycled"]
    scratch = table[table["init"] == "scratch"]
    dense = table[table["init"] == "dense"]

    if upcycled.empty:
        for law in ("dataset", "joint", "model_config"):
            tasks.append(FitTask(law, law, upcycled, reason="no upcycled runs in the store"))
    for experts, top_k, granularity in _moe_configs(upcycled):
        moe = moe_label(experts, top_k, granularity)
        config = dict(experts=experts, top_k=top_k, granularity=granularity, moe=moe)
        group = select_runs(table, "upcycled", **{k: config[k] for k in
                                                  ("experts", "top_k", "granularity")})
        for size, rows in group.groupby("size"):
            for law in DATASET_FAMILY:
                tasks.append(FitTask(f"{law}.{size}.{moe}", law, rows,
                                     _context(rows, init="upcycled", size=str(size), **config)))
        for law in JOINT_FAMILY:
            tasks.append(FitTask(f"{law}.{moe}", law, group,
                                 _context(group, init="upcycled", **config)))

    if not upcycled.empty:
        # the model-configuration law holds D1 and D2 fixed: use the (D1, D2) pair that was run
        # with the most distinct (sparsity, active size) configurations (ties: largest tokens)
        counts = (upcycled.groupby(["d1_tokens", "d2_tokens"])
                  .apply(lambda g: len(g[["sparsity", "active_params"]].drop_duplicates()),
                         include_groups=False)
                  .reset_index(name="configs")
                  .sort_values(["configs", "d1_tokens", "d2_tokens"]))
        d1, d2 = (int(v) for v in counts.iloc[-1][["d1_tokens", "d2_tokens"]])
        rows = upcycled[(upcycled["d1_tokens"] == d1) & (upcycled["d2_tokens"] == d2)]
        tasks.append(FitTask("model_config", "model_config", rows,
                             _context(rows, init="upcycled", d1_tokens=d1, d2_tokens=d2)))

    if dense.empty:
        tasks.append(FitTask("chinchilla_dense", "chinchilla_dense", dense,
                             reason="no dense runs in the store"))
    else:
        tasks.append(FitTask("chinchilla_dense", "chinchilla_dense", dense,
                             _context(dense, init="dense")))

    if scratch.empty:
        tasks.append(FitTask("chinchilla_scratch", "chinchilla_scratch", scratch,
                             reason="no from-scratch MoE runs in the store"))
    for experts, top_k, granularity in _moe_configs(scratch):
        moe = moe_label(experts, top_k, granularity)
        config = dict(experts=experts, top_k=top_k, granularity=granularity, moe=moe)
        group = select_runs(table, "scratch", **{k: config[k] for k in
                                                 ("experts", "top_k", "granularity")})
        tasks.append(FitTask(f"chinchilla_scratch.{moe}", "chinchilla_scratch", group,
                             _context(group, init="scratch", **config)))
        for size, rows in group.groupby("size"):
            tasks.append(FitTask(f"scratch_power.{size}.{moe}", "scratch_power", rows,
                                 _context(rows, init="scratch", size=str(size), **config)))
    return tasks


def _fit_task(law: str, data: dict, context: dict, options: dict) -> FitResult:
    """One planned fit (module-level, so a worker process can run it)."""
    try:
        return fit_law(law, data, context=context, **options)
    except ValueError as error:
        return FitResult.skipped(law, str(error), context)


def fit_all(ds: xr.Dataset, fit_cfg: Mapping[str, Any] | None,
            out_dir: str | Path | None = "results/fits", workers: int = 1) -> dict[str, FitResult]:
    """Fit every law the store supports; skipped laws keep the reason. ``fit_cfg`` is the
    config's ``fit`` section (``bootstrap``, ``huber_delta``, ``seed``; optionally
    ``n_starts``, the grid starts of each main fit). ``workers`` > 1 fits laws in that many
    processes (each fit is seeded, so the results do not depend on it). Logs each fit as it ends."""
    fit_cfg = dict(fit_cfg or {})
    options = dict(huber_delta=float(fit_cfg.get("huber_delta", DEFAULT_HUBER_DELTA)),
                   n_bootstrap=int(fit_cfg.get("bootstrap", 64)),
                   seed=int(fit_cfg.get("seed", 0)))
    if "n_starts" in fit_cfg:  # not a config key: lets tests and quick looks trade care for time
        options["n_starts"] = int(fit_cfg["n_starts"])
    fits: dict[str, FitResult] = {}
    pending = {}
    for task in plan_fits(runs_table(ds)):
        context = {**task.context, "key": task.key}
        if task.reason is not None:
            fits[task.key] = FitResult.skipped(task.law, task.reason, context)
        else:
            pending[task.key] = (task.law, law_data(task.rows, task.law), context, options)
    started, total = time.monotonic(), len(fits) + len(pending)

    def done(key: str, result: FitResult) -> None:
        fits[key] = result
        outcome = (f"RMSE {result.rmse:.4f} on {result.n_points} runs" if result.ok
                   else f"skipped: {result.reason}")
        log.info("fit %d/%d %s: %s (%.0f s)", len(fits), total, key, outcome, time.monotonic() - started)

    if workers > 1 and len(pending) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(_fit_task, *arguments): key for key, arguments in pending.items()}
            for future in as_completed(futures):
                done(futures[future], future.result())
    else:
        for key, arguments in pending.items():
            done(key, _fit_task(*arguments))
    fits = {key: fits[key] for key in sorted(fits)}
    if out_dir is not None:
        out_dir = Path(out_dir)
        for key, result in fits.items():
            result.save(out_dir / f"{key}.json")
    return fits


def load_fits(fits_dir: str | Path) -> dict[str, FitResult]:
    """The fits written by :func:`fit_all`, by key."""
    return {path.stem: FitResult.load(path) for path in sorted(Path(fits_dir).glob("*.json"))}


# --------------------------------------------------------------------------------------------
# Guidance across fits
# --------------------------------------------------------------------------------------------


def _scratch_fit_for(fits: Mapping[str, FitResult], size: str, moe: str) -> FitResult | None:
    """The from-scratch law to compare with: across sizes if fitted, else this size's."""
    for key in (f"chinchilla_scratch.{moe}", f"scratch_power.{size}.{moe}"):
        if key in fits and fits[key].ok:
            return fits[key]
    return None


def _upcycled_pairs(fits: Mapping[str, FitResult]):
    """(upcycled fit, its key, size, scratch fit) for every fitted dataset / joint law."""
    for key, fit in fits.items():
        if not fit.ok or fit.law not in ("dataset", "joint"):
            continue
        moe = fit.context.get("moe")
        sizes = fit.context.get("sizes", {})
        chosen = [fit.context["size"]] if fit.law == "dataset" else sorted(sizes)
        for size in chosen:
            if size not in sizes:
                continue
            scratch = _scratch_fit_for(fits, size, moe)
            if scratch is not None:
                yield fit, key, size, scratch


def compute_guidance(fits: Mapping[str, FitResult], d1_values=None,
                     d2_range: tuple[float, float] = guide.DEFAULT_D2_RANGE) -> list[dict]:
    """Break-even D2* (both compute accountings) of every fitted upcycled law and size, at
    ``d1_values`` (default: the D1 values that were run)."""
    rows = []
    for fit, key, size, scratch in _upcycled_pairs(fits):
        sizes = fit.context["sizes"][size]
        values = d1_values if d1_values is not None else fit.context.get("d1_values", [])
        for row in guide.guidance_table(fit, scratch, values, n1=sizes["n1"], n2=sizes["n2"],
                                        d2_range=d2_range):
            rows.append({"upcycled_fit": key, "scratch_fit": scratch.context.get("key"),
                         "size": size, "moe": fit.context.get("moe"), **row})
    return rows


# --------------------------------------------------------------------------------------------
# Planning: predict one configuration
# --------------------------------------------------------------------------------------------


def _interval(samples: np.ndarray, level: float) -> list[float]:
    samples = np.asarray(samples, dtype=float)
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return [math.nan, math.nan]
    tail = 100 * (1 - level) / 2
    return [float(np.percentile(samples, tail)), float(np.percentile(samples, 100 - tail))]


def _matching_size(sizes: Mapping[str, Mapping[str, float]], n1: float) -> str | None:
    for size, info in sizes.items():
        if math.isclose(info["n1"], n1, rel_tol=0.02):
            return size
    return None


def _active_params(sizes: Mapping[str, Mapping[str, float]], n1: float) -> tuple[float, str]:
    """N2 for a dense size N1: that of a run size, else log-log interpolated across sizes."""
    size = _matching_size(sizes, n1)
    if size is not None:
        return sizes[size]["n2"], f"active parameters of size {size!r}"
    if len(sizes) < 2:
        raise ValueError("n2 (active parameters) is needed: no run size matches n1")
    log_n1 = np.log([info["n1"] for info in sizes.values()])
    log_n2 = np.log([info["n2"] for info in sizes.values()])
    slope, intercept = np.polyfit(log_n1, log_n2, 1)
    return float(np.exp(intercept + slope * math.log(n1))), "log-log interpolation across sizes"


def predict(fits: Mapping[str, FitResult], n1: float, d1: float, d2: float, experts: int,
            top_k: int, granularity: int = 1, *, n2: float | None = None,
            count_sunk_cost: bool = False, level: float = 0.95) -> dict[str, Any]:
    """Predicted loss of upcycling a dense model of n1 parameters trained on d1 tokens into an
    MoE (experts, top_k, granularity) trained on d2 tokens, with a bootstrap interval, and the
    recommendation against training that MoE from scratch with the same compute.

    Uses the joint law of the MoE configuration when fitted, else the dataset law of the run
    size whose N1 matches n1. ``count_sunk_cost``: whether the dense model's compute counts
    against upcycling (False: the dense checkpoint exists anyway). Both accountings are
    reported; ``recommendation`` follows ``count_sunk_cost``.
    """
    moe = moe_label(experts, top_k, granularity)
    notes: list[str] = []
    upcycled: FitResult | None = None
    size: str | None = None
    joint_fit = fits.get(f"joint.{moe}")
    if joint_fit is not None and joint_fit.ok:
        upcycled = joint_fit
        size = _matching_size(joint_fit.context.get("sizes", {}), n1)
    else:
        for fit in fits.values():
            if not (fit.ok and fit.law == "dataset" and fit.context.get("moe") == moe):
                continue
            fit_size = fit.context["size"]
            if _matching_size({fit_size: fit.context["sizes"][fit_size]}, n1) is not None:
                upcycled, size = fit, fit_size
                break
    if upcycled is None:
        raise ValueError(f"no fitted law predicts an upcycled {moe} MoE from a dense model of "
                         f"{n1:g} parameters (need joint.{moe}, or dataset.<size>.{moe} of a "
                         f"size with that N1)")
    sizes = upcycled.context.get("sizes", {})
    if n2 is None:
        n2, how = _active_params(sizes, n1)
        notes.append(f"n2 = {n2:.6g} from {how}")

    variables = {"d1": d1, "d2": d2, **({"n1": n1} if upcycled.law == "joint" else {})}
    loss = float(upcycled.predict(**variables))
    loss_samples = upcycled.predict_samples(**variables)
    out: dict[str, Any] = {
        "inputs": {"n1": n1, "d1": d1, "d2": d2, "experts": experts, "top_k": top_k,
                   "granularity": granularity, "n2": n2},
        "law": upcycled.context.get("key", upcycled.law),
        "loss": loss,
        "interval": _interval(loss_samples, level),
        "level": level,
        "flops_upcycled": 6.0 * n2 * d2,
        "flops_dense": 6.0 * n1 * d1,
    }

    scratch = None
    if f"chinchilla_scratch.{moe}" in fits and fits[f"chinchilla_scratch.{moe}"].ok:
        scratch = fits[f"chinchilla_scratch.{moe}"]
    elif size is not None:
        scratch = _scratch_fit_for(fits, size, moe)
    if scratch is None:
        notes.append("no from-scratch law fitted for this configuration: no recommendation")
        out.update(recommendation=None, by_accounting={}, notes=notes)
        return to_jsonable(out)

    scratch_loss = guide.scratch_loss_fn(scratch, n2)
    upcycled_fn = guide.upcycled_loss_fn(upcycled, n1)
    by_accounting = {}
    for counted in (False, True):
        d_s = float(guide.scratch_tokens(d1, d2, n1, n2, counted))
        scratch_value = float(scratch_loss(d_s))
        scratch_variables = {"d": d_s, **({"n": n2} if "n" in get_law(scratch.law).variables
                                           else {})}
        scratch_samples = scratch.predict_samples(**scratch_variables)
        paired = min(len(loss_samples), len(scratch_samples))
        break_even = guide.break_even_d2(upcycled_fn, scratch_loss, d1, n1=n1, n2=n2,
                                         count_sunk_cost=counted)
        by_accounting["sunk_cost_counted" if counted else "sunk_cost_not_counted"] = {
            "scratch_law": scratch.context.get("key", scratch.law),
            "scratch_tokens": d_s,
            "scratch_loss": scratch_value,
            "scratch_interval": _interval(scratch_samples, level),
            "recommendation": "upcycle" if loss < scratch_value else "scratch",
            # share of (independent) bootstrap pairs in which upcycling is better
            "p_upcycle_better": (float(np.mean(loss_samples[:paired] < scratch_samples[:paired]))
                                 if paired else math.nan),
            "break_even_d2": break_even.d2_star,
            "break_even_status": break_even.status,
        }
    for fit in (upcycled, scratch):
        if fit.bootstrap.get("note"):
            notes.append(f"{fit.context.get('key', fit.law)}: {fit.bootstrap['note']}")
    chosen = by_accounting["sunk_cost_counted" if count_sunk_cost else "sunk_cost_not_counted"]
    out.update(recommendation=chosen["recommendation"], count_sunk_cost=count_sunk_cost,
               by_accounting=by_accounting, notes=notes)
    return to_jsonable(out)


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(int(value))
    try:
        value = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(value):
        return "n/a"
    if math.isinf(value):
        return "∞" if value > 0 else "-∞"
    return f"{value:.4g}"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(cell) if not isinstance(cell, str) else cell
                                for cell in row) + " |" for row in rows]
    return lines + [""]


def _held_out_text(fit: FitResult, variable: str) -> str:
    entry = fit.held_out.get(variable)
    if not entry:
        return "—"
    if "rmse" not in entry:
        return "skipped"
    return f"{_fmt(entry['rmse'])} (n={entry['n_points']})"


def _parameter_lines(fits: Mapping[str, FitResult]) -> list[str]:
    lines = ["## Fitted laws", ""]
    for key, fit in fits.items():
        if not fit.ok:
            continue
        lines += [f"### `{key}`: {fit.formula}", ""]
        lines += [f"{fit.n_points} runs; RMSE {_fmt(fit.rmse)} nats; Huber objective "
                  f"{_fmt(fit.huber)} (delta {_fmt(fit.huber_delta)}); AIC {_fmt(fit.aic)}; "
                  f"BIC {_fmt(fit.bic)}; converged: {'yes' if fit.converged else 'NO'}.", ""]
        header = ["parameter", "value", "std. error", f"bootstrap {fit.interval_level:.0%} "
                  f"interval (n={fit.bootstrap.get('n', 0)})"]
        rows = []
        for name, value in fit.params.items():
            low, high = fit.interval.get(name, [math.nan, math.nan])
            rows.append([name, value, fit.stderr.get(name, math.nan),
                         f"[{_fmt(low)}, {_fmt(high)}]"])
        lines += _table(header, rows)
        if fit.stderr_note:
            lines += [f"Standard errors: {fit.stderr_note}.", ""]
        if fit.bootstrap.get("note"):
            lines += [f"Bootstrap: {fit.bootstrap['note']}.", ""]
        if fit.held_out:
            held = []
            for variable, entry in fit.held_out.items():
                if "rmse" in entry:
                    held.append([f"largest {entry['field']} ({_fmt(entry['value'])})",
                                 entry["n_points"], entry["rmse"], entry["mean_abs_rel_error"]])
                else:
                    held.append([f"largest {entry['field']} ({_fmt(entry['value'])})",
                                 entry["n_points"], "skipped", entry.get("skipped", "")])
            lines += ["Held-out check (refit without these runs, predict them):", ""]
            lines += _table(["held out", "runs", "RMSE", "mean abs. rel. error"], held)
    return lines


def _baseline_lines(fits: Mapping[str, FitResult]) -> list[str]:
    lines = ["## Laws against their baselines", "",
             "Same runs for each row of a group; lower AIC/BIC is better (Gaussian likelihood "
             "of log residuals), ΔAIC relative to the group's main law.", ""]
    any_group = False
    for key, fit in fits.items():
        law = LAWS[fit.law]
        if not fit.ok or not law.baselines:
            continue
        suffix = key[len(fit.law):]
        group = [(key, fit)] + [(b + suffix, fits[b + suffix]) for b in law.baselines
                                if b + suffix in fits]
        rows = []
        for member_key, member in group:
            if not member.ok:
                rows.append([f"`{member_key}`", "skipped", "", "", "", "", "", ""])
                continue
            rows.append([f"`{member_key}`", member.n_params, member.rmse, member.aic,
                         member.aic - fit.aic, member.bic, _held_out_text(member, "d2"),
                         _held_out_text(member, "d1")])
        lines += _table(["law", "params", "RMSE", "AIC", "ΔAIC", "BIC",
                         "held-out RMSE (largest D2)", "held-out RMSE (largest D1)"], rows)
        any_group = True
    if not any_group:
        lines += ["No law with baselines was fitted.", ""]
    return lines


def _guidance_lines(guidance: list[dict]) -> list[str]:
    lines = ["## When to stop upcycling", "",
             "D2*: the MoE tokens beyond which training the same MoE from scratch with the same "
             "compute gives a lower loss (∞: upcycling stays better within the searched range; "
             "0: from scratch is better throughout). 'sunk cost counted': the dense model's "
             "compute 6·N1·D1 is added to the from-scratch budget.", ""]
    if not guidance:
        return lines + ["No pair of fitted upcycled and from-scratch laws: no guidance.", ""]
    rows = [[f"`{row['upcycled_fit']}`", f"`{row['scratch_fit']}`", row["size"], row["d1"],
             "yes" if row["count_sunk_cost"] else "no", row["d2_star"], row["status"],
             row["closed_form_d2_star"], row["effective_d2_exponent"]] for row in guidance]
    return lines + _table(["upcycled law", "scratch law", "size", "D1", "sunk cost counted",
                           "D2*", "status", "closed form", "alpha2 - alpha3 ln D1"], rows)


def _summary(ds: xr.Dataset, table: pd.DataFrame, fits: Mapping[str, FitResult],
             guidance: list[dict], figures: Mapping[str, Path]) -> str:
    counts = table.groupby("init").size().to_dict()
    lines = ["# Upcycling scaling-law report", "",
             f"Code version: `{ds.attrs.get('code_version', 'unknown')}`. Runs: "
             + ", ".join(f"{init} {count}" for init, count in sorted(counts.items())) + ".", "",
             "Laws fitted in log space (Huber loss on log residuals, grid of initial values, "
             "L-BFGS-B and trust-region least squares to tight tolerances); parameters in "
             "natural units (tokens, parameters).", ""]
    lines += _parameter_lines(fits)
    skipped = [[f"`{key}`", fit.reason or ""] for key, fit in fits.items() if not fit.ok]
    if skipped:
        lines += ["## Laws not fitted", ""] + _table(["law", "reason"], skipped)
    lines += _baseline_lines(fits)
    lines += _guidance_lines(guidance)
    lines += ["## Figures", ""]
    for name, path in figures.items():
        lines += [f"![{name}]({path.name})", ""]
    return "\n".join(lines)


# ---- figures --------------------------------------------------------------------------------


def _panels(count: int, title: str):
    columns = max(1, min(count, 3))
    rows = max(1, math.ceil(count / columns))
    figure = Figure(figsize=(4.6 * columns, 3.6 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    figure.suptitle(title)
    for axis in axes[count:]:
        axis.set_visible(False)
    return figure, axes


def _empty_figure(path: Path, message: str) -> None:
    figure = Figure(figsize=(5, 2.5))
    axis = figure.subplots()
    axis.axis("off")
    axis.text(0.5, 0.5, message, ha="center", va="center", wrap=True)
    figure.savefig(path, dpi=110)


def _dataset_fits(fits: Mapping[str, FitResult]) -> list[tuple[str, FitResult]]:
    return [(key, fit) for key, fit in fits.items() if fit.ok and fit.law == "dataset"]


def _log_axis(axes, which: str) -> None:
    """Log scale with labels at the decades only: minor labels overlap over a short range."""
    getattr(axes, f"set_{which}scale")("log")
    axis = getattr(axes, f"{which}axis")
    axis.set_major_locator(LogLocator(base=10))
    axis.set_minor_formatter(NullFormatter())


def _fit_rows(table: pd.DataFrame, fit: FitResult) -> pd.DataFrame:
    context = fit.context
    return select_runs(table, "upcycled", size=context.get("size"),
                       experts=context.get("experts"), top_k=context.get("top_k"),
                       granularity=context.get("granularity"))


def _figure_loss_vs_d2(path, table, fits):
    chosen = _dataset_fits(fits)
    if not chosen:
        return _empty_figure(path, "no fitted dataset law")
    figure, axes = _panels(len(chosen), "Upcycled MoE loss vs D2 (points: runs; lines: fits)")
    for axis, (key, fit) in zip(axes, chosen):
        rows = _fit_rows(table, fit)
        d1_values = sorted(rows["d1_tokens"].unique())
        d2_grid = np.geomspace(rows["d2_tokens"].min() / 1.5, rows["d2_tokens"].max() * 1.5, 200)
        suffix = key[len("dataset"):]
        baseline = fits.get("dataset_no_interaction" + suffix)
        for index, d1 in enumerate(d1_values):
            colour = f"C{index % 10}"
            sel = rows[rows["d1_tokens"] == d1]
            axis.scatter(sel["d2_tokens"], sel["final_val_loss"], color=colour, s=18,
                         label=f"D1={d1:.3g}")
            axis.plot(d2_grid, fit.predict(d1=d1, d2=d2_grid), color=colour)
            if baseline is not None and baseline.ok:
                axis.plot(d2_grid, baseline.predict(d1=d1, d2=d2_grid), color=colour,
                          linestyle=":", linewidth=1)
        _log_axis(axis, "x")
        axis.set_xlabel("D2 (MoE tokens)")
        axis.set_ylabel("validation loss (nats)")
        axis.set_title(f"{key} (dotted: no interaction)", fontsize=9)
        axis.legend(fontsize=7)
    figure.savefig(path, dpi=110)


def _figure_residuals(path, table, fits):
    chosen = _dataset_fits(fits)
    if not chosen:
        return _empty_figure(path, "no fitted dataset law")
    figure, axes = _panels(len(chosen), "Residuals (observed - fitted loss)")
    for axis, (key, fit) in zip(axes, chosen):
        rows = _fit_rows(table, fit)
        suffix = key[len("dataset"):]
        for index, law in enumerate(DATASET_FAMILY):
            member = fits.get(law + suffix)
            if member is None or not member.ok:
                continue
            predicted = member.predict(d1=rows["d1_tokens"].to_numpy(float),
                                       d2=rows["d2_tokens"].to_numpy(float))
            axis.scatter(rows["d2_tokens"] * (1 + 0.04 * index),  # offset: markers overlap
                         rows["final_val_loss"] - predicted, s=14, label=law, color=f"C{index}")
        axis.axhline(0, color="grey", linewidth=0.8)
        _log_axis(axis, "x")
        axis.set_xlabel("D2 (MoE tokens)")
        axis.set_ylabel("residual (nats)")
        axis.set_title(key, fontsize=9)
        axis.legend(fontsize=7)
    figure.savefig(path, dpi=110)


def _figure_effective_exponent(path, fits):
    chosen = [(key, fit) for key, fit in fits.items()
              if fit.ok and fit.law in ("dataset", "joint")]
    if not chosen:
        return _empty_figure(path, "no fitted dataset or joint law")
    figure = Figure(figsize=(6, 4), layout="constrained")
    axis = figure.subplots()
    for index, (key, fit) in enumerate(chosen):
        d1_values = fit.context.get("d1_values") or fit.data_range.get("d1")
        d1_grid = np.geomspace(min(d1_values) / 10, max(d1_values) * 100, 100)
        exponent = fit.params["alpha2"] - fit.params["alpha3"] * np.log(d1_grid)
        axis.plot(d1_grid, exponent, color=f"C{index}", label=key)
        samples = fit.bootstrap.get("samples") or {}
        if samples.get("alpha2"):
            draws = (np.asarray(samples["alpha2"])[:, None]
                     - np.asarray(samples["alpha3"])[:, None] * np.log(d1_grid))
            low, high = np.nanpercentile(draws, [2.5, 97.5], axis=0)
            axis.fill_between(d1_grid, low, high, color=f"C{index}", alpha=0.2)
        axis.axvspan(min(d1_values), max(d1_values), color="grey", alpha=0.08)
    _log_axis(axis, "x")
    axis.set_xlabel("D1 (dense tokens)")
    axis.set_ylabel("effective D2 exponent alpha2 - alpha3 ln D1")
    axis.set_title("Effective D2 exponent (band: bootstrap 95%; grey: runs' D1)", fontsize=9)
    axis.legend(fontsize=7)
    figure.savefig(path, dpi=110)


def _figure_break_even(path, fits, d2_range):
    pairs = list(_upcycled_pairs(fits))
    if not pairs:
        return _empty_figure(path, "no pair of fitted upcycled and from-scratch laws")
    figure = Figure(figsize=(6, 4), layout="constrained")
    axis = figure.subplots()
    for index, (fit, key, size, scratch) in enumerate(pairs):
        sizes = fit.context["sizes"][size]
        d1_values = fit.context.get("d1_values")
        d1_grid = np.geomspace(min(d1_values) / 10, max(d1_values) * 100, 40)
        upcycled = guide.upcycled_loss_fn(fit, sizes["n1"])
        scratch_loss = guide.scratch_loss_fn(scratch, sizes["n2"])
        for counted, style in ((False, "-"), (True, "--")):
            d2_star = np.array([guide.break_even_d2(upcycled, scratch_loss, d1,
                                                    n1=sizes["n1"], n2=sizes["n2"],
                                                    count_sunk_cost=counted,
                                                    d2_range=d2_range).d2_star
                                for d1 in d1_grid])
            finite = np.isfinite(d2_star) & (d2_star > 0)
            label = f"{key} [{size}] {'sunk counted' if counted else 'sunk not counted'}"
            axis.plot(d1_grid[finite], d2_star[finite], style, color=f"C{index}", label=label)
    _log_axis(axis, "x")
    _log_axis(axis, "y")
    axis.set_xlabel("D1 (dense tokens)")
    axis.set_ylabel("break-even D2* (MoE tokens)")
    axis.set_title("Beyond D2*, an MoE from scratch with the same compute is better", fontsize=9)
    axis.legend(fontsize=6)
    figure.savefig(path, dpi=110)


def _figure_equal_compute(path, fits):
    pairs = list(_upcycled_pairs(fits))
    if not pairs:
        return _empty_figure(path, "no pair of fitted upcycled and from-scratch laws")
    fit, key, size, scratch = pairs[0]
    sizes = fit.context["sizes"][size]
    d1_values = fit.context.get("d1_values")
    d2_values = fit.context.get("d2_values")
    d2_grid = np.geomspace(min(d2_values) / 4, max(d2_values) * 100, 200)
    figure, axes = _panels(2, f"Upcycled ({key}) vs from scratch ({scratch.context.get('key')}) "
                              f"at equal compute, size {size}")
    for axis, counted in zip(axes, (False, True)):
        for index, d1 in enumerate(d1_values):
            curves = guide.equal_compute_curves(fit, scratch, d1, d2_grid, n1=sizes["n1"],
                                                n2=sizes["n2"], count_sunk_cost=counted)
            axis.plot(curves["compute"], curves["upcycled_loss"], color=f"C{index}",
                      label=f"upcycled, D1={d1:.3g}")
            # The from-scratch curve is the same for every D1 (it only shifts in where it starts
            # when the sunk cost is counted): black, dashed, under the upcycled curves.
            axis.plot(curves["compute"], curves["scratch_loss"], color="black", linestyle="--",
                      linewidth=1, zorder=1, label="from scratch" if index == 0 else None)
        _log_axis(axis, "x")
        axis.set_xlabel("training FLOPs (6 N D)" + (" incl. dense" if counted else " of MoE stage"))
        axis.set_ylabel("predicted loss (nats)")
        axis.set_title("sunk cost counted" if counted else "sunk cost not counted", fontsize=9)
        axis.legend(fontsize=7)
    figure.savefig(path, dpi=110)


def write_report(ds: xr.Dataset, fits: Mapping[str, FitResult], guidance: list[dict] | None,
                 out_dir: str | Path,
                 d2_range: tuple[float, float] = guide.DEFAULT_D2_RANGE) -> dict[str, Path]:
    """Write ``summary.md``, ``guidance.json`` and the figures (``FIGURES``) to ``out_dir``.

    ``guidance``: rows of :func:`compute_guidance` (computed here when None).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = runs_table(ds)
    if guidance is None:
        guidance = compute_guidance(fits, d2_range=d2_range)
    figures = {name: out_dir / filename for name, filename in FIGURES.items()}
    _figure_loss_vs_d2(figures["loss_vs_d2"], table, fits)
    _figure_residuals(figures["residuals"], table, fits)
    _figure_effective_exponent(figures["effective_exponent"], fits)
    _figure_break_even(figures["break_even"], fits, d2_range)
    _figure_equal_compute(figures["equal_compute"], fits)

    written = dict(figures)
    written["guidance"] = out_dir / "guidance.json"
    written["guidance"].write_text(json.dumps(to_jsonable(guidance), indent=2) + "\n")
    written["summary"] = out_dir / "summary.md"
    written["summary"].write_text(_summary(ds, table, fits, guidance, figures))
    return written
