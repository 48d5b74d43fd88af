"""The report's figures. ``FIGURES`` (name -> file name, ``upcycling.core.layout.REPORT_FIGURES``) is the
one list of them: the report writes exactly these, and the Snakemake ``report`` rule declares them.

``write_figures(table, fits: FitSet, out_dir, vocab_size=None) -> dict[str, Path]``.

Every figure stays within the runs plus one decade of extrapolation, drawn dashed over a grey
band; fitted curves carry their 95% bootstrap band; the from-scratch runs are plotted beside
the upcycled ones; losses above ln(vocabulary) (worse than a uniform guess) are cut off.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import LogLocator, NullFormatter

from upcycling.analysis import guidance as guide
from upcycling.analysis.fitset import COMPARED_LAWS, DATASET_FAMILY, FitKey, FitSet
from upcycling.analysis.fitstage import select_runs
from upcycling.analysis.reinit import ratio_groups, single_ratio_note
from upcycling.core.layout import REPORT_FIGURES

__all__ = ["FIGURES", "write_figures"]

FIGURES = REPORT_FIGURES
EXTRAPOLATION = 10.0  # one decade beyond the runs


def _panels(count: int, title: str):
    columns = max(1, min(count, 3))
    rows = max(1, math.ceil(count / columns))
    figure = Figure(figsize=(max(4.8 * columns, 6.5), 3.8 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    figure.suptitle(title, fontsize=10 if columns > 1 else 8)
    for axis in axes[count:]:
        axis.set_visible(False)
    return figure, axes


def _empty(path: Path, message: str) -> None:
    figure = Figure(figsize=(5, 2.5))
    axis = figure.subplots()
    axis.axis("off")
    axis.text(0.5, 0.5, message, ha="center", va="center", wrap=True)
    figure.savefig(path, dpi=110)


def _log_axis(axes, which: str) -> None:
    """Log scale with labels at the decades only: minor labels overlap over a short range."""
    getattr(axes, f"set_{which}scale")("log")
    axis = getattr(axes, f"{which}axis")
    axis.set_major_locator(LogLocator(base=10))
    axis.set_minor_formatter(NullFormatter())


def _extrapolated(axis, start: float, end: float) -> None:
    axis.axvspan(start, end, color="grey", alpha=0.1, lw=0)


def _band(axis, x, samples, colour) -> None:
    if len(samples) >= 2:
        low, high = np.nanpercentile(samples, [2.5, 97.5], axis=0)
        axis.fill_between(x, low, high, color=colour, alpha=0.18, lw=0)


def _curve(axis, x, y, data_max, colour, **kwargs) -> None:
    """Solid within the runs, dashed over the extrapolated decade."""
    split = int(np.searchsorted(x, data_max * 1.0001))  # x ascending
    axis.plot(x[:split], y[:split], color=colour, **kwargs)
    kwargs.pop("label", None)
    start = max(split - 1, 0)  # the dashed part starts where the solid one ends
    axis.plot(x[start:], y[start:], color=colour, linestyle="--", **kwargs)


def _cap(axis, vocab_size: int | None) -> None:
    if vocab_size:
        ceiling = math.log(vocab_size)
        axis.axhline(ceiling, color="red", linewidth=0.7, linestyle=":")
        low, high = axis.get_ylim()
        axis.set_ylim(low, min(high, ceiling * 1.02))


def _runs_of(table: pd.DataFrame, key: FitKey, init: str = "upcycled", size: str | None = None) -> pd.DataFrame:
    """The runs of ``init`` with the fit's method, size (or ``size``) and MoE variant (from-scratch
    runs: whatever the fit's re-initialisation ratio, they have none)."""
    moe = key.moe
    return select_runs(
        table,
        init,
        method=key.method,
        size=key.size if size is None else size,
        experts=None if moe is None else moe.experts,
        top_k=None if moe is None else moe.top_k,
        granularity=None if moe is None else moe.granularity,
        reinit_ratio=None if moe is None or init != "upcycled" else moe.reinit_ratio,
    )


def _loss_vs_d2(path, table, fits: FitSet, vocab_size):
    chosen = fits.select(["dataset"], fitted=True)
    if not chosen:
        return _empty(path, "no fitted dataset law")
    figure, axes = _panels(
        len(chosen),
        "Loss vs D2: runs (dots), fits with 95% bands; from scratch (black x, grey line); grey: extrapolated",
    )
    for axis, (key, fit) in zip(axes, chosen):
        rows = _runs_of(table, key)
        scratch_rows = _runs_of(table, key, "scratch")
        d2_max = rows["d2_tokens"].max()
        low = min(rows["d2_tokens"].min(), scratch_rows["d2_tokens"].min() if not scratch_rows.empty else np.inf)
        grid = np.geomspace(low, d2_max * EXTRAPOLATION, 160)
        for index, d1 in enumerate(sorted(rows["d1_tokens"].unique())):
            colour = f"C{index % 10}"
            sel = rows[rows["d1_tokens"] == d1]
            axis.scatter(sel["d2_tokens"], sel["final_val_loss"], color=colour, s=18, zorder=3)
            _curve(axis, grid, fit.predict(d1=d1, d2=grid), d2_max, colour, label=f"D1={d1:.3g}")
            _band(axis, grid, fit.predict_samples(d1=d1, d2=grid), colour)
        if not scratch_rows.empty:
            axis.scatter(
                scratch_rows["d2_tokens"],
                scratch_rows["final_val_loss"],
                marker="x",
                color="black",
                s=22,
                zorder=3,
                label="from scratch (D tokens)",
            )
            scratch = fits.fitted(key.scratch_key("scratch_power"))
            if scratch is not None:
                _curve(axis, grid, scratch.predict(d=grid), scratch_rows["d2_tokens"].max(), "grey", linewidth=1)
        _extrapolated(axis, d2_max, grid[-1])
        _log_axis(axis, "x")
        axis.set_xlabel("D2 (second-stage tokens; scratch: D)")
        axis.set_ylabel("validation loss (nats)")
        axis.set_title(f"{fit.key} [{fit.status}]", fontsize=8)
        axis.legend(fontsize=6)
        _cap(axis, vocab_size)
    figure.savefig(path, dpi=110)


def _residuals(path, table, fits: FitSet):
    chosen = fits.select(["dataset"], fitted=True)
    if not chosen:
        return _empty(path, "no fitted dataset law")
    figure, axes = _panels(len(chosen), "Residuals (observed - fitted loss) of the dataset law and its baselines")
    for axis, (key, fit) in zip(axes, chosen):
        rows = _runs_of(table, key)
        for index, law in enumerate(DATASET_FAMILY):
            member = fits.fitted(key.with_law(law))
            if member is None:
                continue
            predicted = member.predict(d1=rows["d1_tokens"].to_numpy(float), d2=rows["d2_tokens"].to_numpy(float))
            axis.scatter(
                rows["d2_tokens"] * (1 + 0.04 * index),  # offset: markers overlap
                rows["final_val_loss"] - predicted,
                s=14,
                label=law,
                color=f"C{index}",
            )
        axis.axhline(0, color="grey", linewidth=0.8)
        _log_axis(axis, "x")
        axis.set_xlabel("D2 (tokens)")
        axis.set_ylabel("residual (nats)")
        axis.set_title(fit.key, fontsize=8)
        axis.legend(fontsize=6)
    figure.savefig(path, dpi=110)


def _effective_exponent(path, fits: FitSet):
    chosen = [fit for _, fit in fits.select(COMPARED_LAWS, fitted=True)]
    if not chosen:
        return _empty(path, "no fitted dataset or joint law")
    figure = Figure(figsize=(6.5, 4.2), layout="constrained")
    axis = figure.subplots()
    negative = []
    d1_low = min(min(fit.context.get("d1_values") or fit.data_range["d1"]) for fit in chosen)
    d1_high = max(max(fit.context.get("d1_values") or fit.data_range["d1"]) for fit in chosen)
    grid = np.geomspace(d1_low, d1_high * EXTRAPOLATION, 100)
    for index, fit in enumerate(chosen):
        colour = f"C{index % 10}"
        gamma = fit.params["alpha2"] - fit.params["alpha3"] * np.log(grid)
        _curve(axis, grid, gamma, max(fit.context.get("d1_values") or fit.data_range["d1"]), colour, label=fit.key)
        samples = fit.bootstrap.get("samples") or {}
        if samples.get("alpha2"):
            _band(
                axis,
                grid,
                np.asarray(samples["alpha2"])[:, None] - np.asarray(samples["alpha3"])[:, None] * np.log(grid),
                colour,
            )
        if (gamma < 0).any():
            negative.append(f"{fit.key}: below 0 from D1 = {grid[np.argmax(gamma < 0)]:.3g}")
    axis.axhline(0, color="black", linewidth=0.7)
    _extrapolated(axis, d1_high, grid[-1])
    if negative:
        axis.text(
            0.02,
            0.02,
            "Warning: effective exponent < 0 (more D2 would raise the loss; "
            "an extrapolation of the law, not a measurement):\n" + "\n".join(negative),
            transform=axis.transAxes,
            fontsize=6,
            color="red",
            va="bottom",
        )
    _log_axis(axis, "x")
    axis.set_xlabel("D1 (dense tokens)")
    axis.set_ylabel("alpha2 - alpha3 ln D1")
    axis.set_title("Effective D2 exponent (band: bootstrap 95%; grey: extrapolated)", fontsize=9)
    axis.legend(fontsize=6)
    figure.savefig(path, dpi=110)


def _break_even(path, fits: FitSet):
    pairs = fits.upcycled_pairs()
    if not pairs:
        return _empty(path, "no pair of fitted upcycled and from-scratch laws")
    n1_of = {pair.size: pair.upcycled.context["sizes"][pair.size]["n1"] for pair in pairs}
    sizes = sorted(n1_of, key=lambda size: n1_of[size])
    figure, axes = _panels(
        len(sizes),
        "Break-even D2*: beyond it the same architecture from scratch with the same compute is better (band: 95%)",
    )
    for axis, size in zip(axes, sizes):
        for index, (fit, scratch) in enumerate((p.upcycled, p.scratch) for p in pairs if p.size == size):
            n1, n2 = fit.context["sizes"][size]["n1"], fit.context["sizes"][size]["n2"]
            d1_values = fit.context["d1_values"]
            d2_range = guide.search_range(fit.context["d2_values"])
            grid = np.geomspace(min(d1_values), max(d1_values) * EXTRAPOLATION, 14)
            for counted, style in ((False, "-"), (True, "--")):
                points, low, high = [], [], []
                for d1 in grid:
                    samples = guide.break_even_samples(
                        fit, scratch, d1, n1=n1, n2=n2, count_sunk_cost=counted, d2_range=d2_range
                    )
                    points.append(
                        guide.break_even_d2(
                            guide.upcycled_loss_fn(fit, n1),
                            guide.scratch_loss_fn(scratch, n2),
                            d1,
                            n1=n1,
                            n2=n2,
                            count_sunk_cost=counted,
                            d2_range=d2_range,
                        ).d2_star
                    )
                    finite = samples[np.isfinite(samples) & (samples > 0)]
                    low.append(np.percentile(finite, 2.5) if finite.size > 1 else np.nan)
                    high.append(np.percentile(finite, 97.5) if finite.size > 1 else np.nan)
                estimates = np.array(points)
                shown = np.where(np.isfinite(estimates) & (estimates > 0), estimates, np.nan)
                colour = f"C{index % 10}"
                axis.plot(
                    grid, shown, style, color=colour, label=f"{fit.key} ({'dense cost counted' if counted else 'sunk'})"
                )
                axis.fill_between(grid, low, high, color=colour, alpha=0.12, lw=0)
            axis.set_ylim(*d2_range)
        _extrapolated(axis, max(d1_values), grid[-1])
        _log_axis(axis, "x")
        _log_axis(axis, "y")
        axis.set_xlabel("D1 (dense tokens)")
        axis.set_ylabel("D2* (tokens; y range: runs' D2 ± a decade)")
        axis.set_title(f"size {size}", fontsize=9)
        axis.legend(fontsize=5)
    figure.savefig(path, dpi=110)


def _equal_compute(path, table, fits: FitSet, vocab_size):
    pairs = [p for p in fits.upcycled_pairs() if p.upcycled_key.law == "dataset"] or fits.upcycled_pairs()
    if not pairs:
        return _empty(path, "no pair of fitted upcycled and from-scratch laws")
    figure, axes = _panels(
        len(pairs), "Upcycled (colours, per D1) vs from scratch (black) at equal compute 6·N·D; dense cost not counted"
    )
    for axis, pair in zip(axes, pairs):
        fit, size, scratch = pair.upcycled, pair.size, pair.scratch
        n1, n2 = fit.context["sizes"][size]["n1"], fit.context["sizes"][size]["n2"]
        d2_values = fit.context["d2_values"]
        grid = np.geomspace(min(d2_values), max(d2_values) * EXTRAPOLATION, 160)
        for index, d1 in enumerate(fit.context["d1_values"]):
            curves = guide.equal_compute_curves(fit, scratch, d1, grid, n1=n1, n2=n2, count_sunk_cost=False)
            _curve(
                axis,
                curves["compute"],
                curves["upcycled_loss"],
                6 * n2 * max(d2_values),
                f"C{index % 10}",
                label=f"upcycled, D1={d1:.3g}",
            )
        rows = _runs_of(table, pair.upcycled_key, "scratch", size)
        d_max = rows["d2_tokens"].max() if not rows.empty else max(d2_values)
        d_grid = np.geomspace(min(d2_values), d_max * EXTRAPOLATION, 160)
        scratch_loss = guide.scratch_loss_fn(scratch, n2)(d_grid)
        _curve(
            axis,
            6 * n2 * d_grid,
            scratch_loss,
            6 * n2 * d_max,
            "black",
            linewidth=1,
            label=f"from scratch ({scratch.key})",
        )
        if not rows.empty:
            axis.scatter(
                6 * rows["n2_params"] * rows["d2_tokens"],
                rows["final_val_loss"],
                marker="x",
                color="black",
                s=22,
                zorder=3,
            )
        _extrapolated(axis, 6 * n2 * max(d2_values), 6 * n2 * grid[-1])
        _log_axis(axis, "x")
        axis.set_xlabel("second-stage FLOPs 6·N2·D")
        axis.set_ylabel("loss (nats)")
        axis.set_title(f"{fit.key}, size {size}", fontsize=8)
        axis.legend(fontsize=6)
        _cap(axis, vocab_size)
    figure.savefig(path, dpi=110)


def _model_config(path, table, fits: FitSet):
    chosen = [fit for _, fit in fits.select(["model_config"])]
    if not chosen:
        return _empty(path, "no model-configuration law planned (no upcycled runs)")
    figure, axes = _panels(len(chosen), "Model-configuration law: loss vs N2 per sparsity P at one (D1, D2)")
    for axis, fit in zip(axes, chosen):
        c = fit.context
        rows = table[
            (table["init"] == "upcycled")
            & (table["method"] == c.get("method"))
            & (table["d1_tokens"] == c.get("d1_tokens"))
            & (table["d2_tokens"] == c.get("d2_tokens"))
        ]
        n2_grid = np.geomspace(rows["n2_params"].min(), rows["n2_params"].max() * EXTRAPOLATION, 80)
        for index, (config, group) in enumerate(rows.groupby(["experts", "top_k"])):
            colour = f"C{index % 10}"
            p = float(group["sparsity"].median())
            axis.scatter(
                group["n2_params"],
                group["final_val_loss"],
                color=colour,
                s=18,
                label=f"E={config[0]}, k={config[1]} (P≈{p:.2f})",
            )
            if fit.ok:
                _curve(axis, n2_grid, fit.predict(p=p, n2=n2_grid), rows["n2_params"].max(), colour)
                _band(axis, n2_grid, fit.predict_samples(p=p, n2=n2_grid), colour)
        _extrapolated(axis, rows["n2_params"].max(), n2_grid[-1])
        _log_axis(axis, "x")
        axis.set_xlabel("N2 (active parameters)")
        axis.set_ylabel("loss (nats)")
        axis.set_title(f"{fit.key} [{fit.status}]" + ("" if fit.ok else f": {fit.reason}"), fontsize=7, wrap=True)
        axis.legend(fontsize=6)
    figure.savefig(path, dpi=110)


def _reinit_ratio(path, table, fits: FitSet, vocab_size):
    groups = ratio_groups(fits)
    if not groups:
        return _empty(path, single_ratio_note(fits))
    figure, axes = _panels(
        len(groups),
        "Loss vs D2 at the largest D1, a colour per re-initialisation ratio r\n"
        "runs (dots), dataset law with 95% band; grey: extrapolated",
    )
    for axis, group in zip(axes, groups):
        runs = [(key, _runs_of(table, key)) for key in group.keys]
        d2_values = pd.concat([rows["d2_tokens"] for _, rows in runs])
        d1 = pd.concat([rows["d1_tokens"] for _, rows in runs]).max()
        grid = np.geomspace(d2_values.min(), d2_values.max() * EXTRAPOLATION, 160)
        for index, ((key, rows), ratio) in enumerate(zip(runs, group.ratios)):
            colour = f"C{index % 10}"
            chosen = rows[rows["d1_tokens"] == d1]
            axis.scatter(chosen["d2_tokens"], chosen["final_val_loss"], color=colour, s=18, zorder=3)
            fit = fits.fitted(key)
            if fit is not None:
                _curve(axis, grid, fit.predict(d1=d1, d2=grid), d2_values.max(), colour, label=f"r = {ratio:g}")
                _band(axis, grid, fit.predict_samples(d1=d1, d2=grid), colour)
        _extrapolated(axis, d2_values.max(), grid[-1])
        _log_axis(axis, "x")
        axis.set_xlabel("D2 (second-stage tokens)")
        axis.set_ylabel("validation loss (nats)")
        axis.set_title(f"{group.title}, D1 = {d1:.3g}", fontsize=8)
        axis.legend(fontsize=6)
        _cap(axis, vocab_size)
    figure.savefig(path, dpi=110)


def write_figures(
    table: pd.DataFrame, fits: FitSet, out_dir: str | Path, vocab_size: int | None = None
) -> dict[str, Path]:
    """Write every figure of ``FIGURES`` into ``out_dir``; ``vocab_size`` caps loss axes at
    ln(vocabulary)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / filename for name, filename in FIGURES.items()}
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        _loss_vs_d2(paths["loss_vs_d2"], table, fits, vocab_size)
        _residuals(paths["residuals"], table, fits)
        _effective_exponent(paths["effective_exponent"], fits)
        _break_even(paths["break_even"], fits)
        _equal_compute(paths["equal_compute"], table, fits, vocab_size)
        _model_config(paths["model_config"], table, fits)
        _reinit_ratio(paths["reinit_ratio"], table, fits, vocab_size)
    return paths
