"""The fit stage (``upcycling fit``): the store as a tidy table, which law to fit to which runs,
and every fit run and written.

Public names:

- ``PARAMETER_COUNTS``: the two counting conventions, ``non_embedding`` (the default) and
  ``total`` (embeddings included), each naming the store's columns it reads N1, N2 and the
  total parameters from
- ``runs_table(ds, counts="non_embedding") -> pandas.DataFrame``: one row per run that exists,
  with ``n1_params`` (N1), ``n2_params`` (N2), ``total_params`` and ``sparsity`` (P = total /
  N2) under that convention, and ``reinit_ratio`` (0 where the store has no such coordinate:
  a store aggregated before Drop-Upcycling existed)
- ``select_runs(table, init, method=None, size=None, experts=None, top_k=None,
  granularity=None, reinit_ratio=None)``
- ``law_data(table, law) -> dict[str, np.ndarray]``: a law's variables and ``loss``
- ``plan_fits(table) -> list[FitTask]``: which law to fit to which runs (pure)
- ``fit_all(ds, fit_cfg, out_dir=None, workers=1, counts="non_embedding", monotone=False)
  -> dict[str, FitResult]``
- ``load_fits(fits_dir) -> dict[str, FitResult]``

Each task is named by a :class:`~upcycling.analysis.fitset.FitKey` (law, method, size, MoE
variant with its re-initialisation ratio r; its string names the fit's file). The dataset and
joint laws are fitted per r; the model-configuration law to the r = 0 runs (its extra
configurations are run at r = 0 only). The from-scratch baseline of a method is the scratch
runs of that method (for ``moe_upcycle`` the same MoE, whatever r; for ``continue`` and
``grow_*`` the target dense architecture).
"""

from __future__ import annotations

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

from upcycling.analysis.fitresult import DEFAULT_HUBER_DELTA, FitResult
from upcycling.analysis.fitset import DATASET_FAMILY, JOINT_FAMILY, FitKey, MoeVariant
from upcycling.analysis.fitting import fit_law
from upcycling.analysis.intervals import DEFAULT_TOKEN_UNIT, TOKEN_UNITS
from upcycling.analysis.laws import Law, get_law
from upcycling.analysis.store import COORD_DEFAULTS, COORDS, EXPERT_SUMMARIES, SCALARS
from upcycling.analysis.twostep import two_step

log = logging.getLogger(__name__)

__all__ = [
    "PARAMETER_COUNTS",
    "FitTask",
    "fit_all",
    "law_data",
    "load_fits",
    "plan_fits",
    "runs_table",
    "select_runs",
]

# convention -> store column of N1 (the dense model's parameters), N2 (the second-stage
# model's active parameters) and the second-stage model's total parameters
PARAMETER_COUNTS = {
    "non_embedding": {
        "n1_params": "dense_non_embedding_params",
        "n2_params": "active_non_embedding_params",
        "total_params": "non_embedding_params",
    },
    "total": {"n1_params": "dense_params", "n2_params": "active_params", "total_params": "n_params"},
}


_COLUMN_TYPES = {str: str, int: np.int64, float: float}  # a store coordinate's type -> its column's


def runs_table(ds: xr.Dataset, counts: str = "non_embedding") -> pd.DataFrame:
    """One row per run that exists (finite final loss): coordinates, scalars, and N1, N2, the
    total parameters and P under the ``counts`` convention (``PARAMETER_COUNTS``)."""
    if counts not in PARAMETER_COUNTS:
        raise ValueError(f"parameter counts {counts!r}: use one of {', '.join(PARAMETER_COUNTS)}")
    present = [name for name in (*SCALARS, *EXPERT_SUMMARIES) if name in ds]
    table = ds[present].load().to_dataframe().reset_index()
    table = table[np.isfinite(table["final_val_loss"])].copy()
    for name, default in COORD_DEFAULTS.items():  # a store aggregated before the coordinate existed
        if name not in table:
            table[name] = default
    for name, kind in COORDS.items():
        table[name] = table[name].astype(_COLUMN_TYPES[kind])
    for column, source in PARAMETER_COUNTS[counts].items():
        if source not in table or not np.isfinite(table[source]).any():
            raise ValueError(
                f"the store has no {source!r} ({counts} parameter counts): "
                f"aggregate the runs again with this version, or fit with "
                f"--parameter-counts {'total' if counts != 'total' else 'non_embedding'}"
            )
        table[column] = table[source].astype(float)
    table["sparsity"] = table["total_params"] / table["n2_params"]
    return table.reset_index(drop=True)


def select_runs(
    table: pd.DataFrame,
    init: str,
    method: str | None = None,
    size: str | None = None,
    experts: int | None = None,
    top_k: int | None = None,
    granularity: int | None = None,
    reinit_ratio: float | None = None,
) -> pd.DataFrame:
    """Rows of one initialisation, optionally one method, size and MoE configuration."""
    mask = table["init"] == init
    for name, value in (
        ("method", method),
        ("size", size),
        ("experts", experts),
        ("top_k", top_k),
        ("granularity", granularity),
        ("reinit_ratio", reinit_ratio),
    ):
        if value is not None:
            mask &= table[name] == value
    return table[mask]


def law_data(table: pd.DataFrame, law: str | Law) -> dict[str, np.ndarray]:
    """The law's variables (from their fields, see ``Law.fields``) and ``loss`` as arrays."""
    law = get_law(law)
    data = {variable: table[field].to_numpy(dtype=float) for variable, field in law.fields.items()}
    data["loss"] = table["final_val_loss"].to_numpy(dtype=float)
    return data


# --------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------


@dataclass
class FitTask:
    key: FitKey
    rows: pd.DataFrame = field(repr=False)
    context: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None  # set when there is nothing to fit at all

    @property
    def law(self) -> str:
        return self.key.law


def _size_table(rows: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Per dense size: N1, N2 and the total parameters of these runs (the fit's counts)."""
    return {
        str(size): {
            "n1": float(group["n1_params"].median()),
            "n2": float(group["n2_params"].median()),
            "n_total": float(group["total_params"].median()),
        }
        for size, group in rows.groupby("size")
    }


def _context(rows: pd.DataFrame, **extra) -> dict[str, Any]:
    return {
        **extra,
        "sizes": _size_table(rows),
        "d1_values": sorted(float(v) for v in rows["d1_tokens"].unique()),
        "d2_values": sorted(float(v) for v in rows["d2_tokens"].unique()),
        "n_runs": int(len(rows)),
    }


def _variants(rows: pd.DataFrame) -> list[MoeVariant]:
    return sorted(
        {
            MoeVariant(int(e), int(k), int(g), float(r))
            for e, k, g, r in rows[["experts", "top_k", "granularity", "reinit_ratio"]].itertuples(index=False)
        }
    )


def _variant_context(init: str, method: str, moe: MoeVariant) -> dict[str, Any]:
    return dict(
        init=init,
        method=method,
        experts=moe.experts,
        top_k=moe.top_k,
        granularity=moe.granularity,
        reinit_ratio=moe.reinit_ratio,
        moe=str(moe),
    )


def _select(table: pd.DataFrame, init: str, method: str, moe: MoeVariant) -> pd.DataFrame:
    return select_runs(
        table,
        init,
        method=method,
        experts=moe.experts,
        top_k=moe.top_k,
        granularity=moe.granularity,
        reinit_ratio=moe.reinit_ratio,
    )


def _model_config_task(runs: pd.DataFrame, method: str) -> FitTask:
    """The (D1, D2) pair run with the most distinct (P, N2) configurations (ties: most tokens)."""
    counts = (
        runs.groupby(["d1_tokens", "d2_tokens"])[["sparsity", "n2_params"]]
        .apply(lambda g: len(g.drop_duplicates()))
        .reset_index(name="configs")
        .sort_values(["configs", "d1_tokens", "d2_tokens"])
    )
    d1, d2 = (int(v) for v in counts.iloc[-1][["d1_tokens", "d2_tokens"]])
    rows = runs[(runs["d1_tokens"] == d1) & (runs["d2_tokens"] == d2)]
    return FitTask(
        FitKey("model_config", method),
        rows,
        _context(
            rows,
            init="upcycled",
            method=method,
            d1_tokens=d1,
            d2_tokens=d2,
            moe=", ".join(str(moe) for moe in _variants(rows)),
        ),
    )


def plan_fits(table: pd.DataFrame) -> list[FitTask]:
    """Every (law, runs) pair the study defines, from the tidy runs table.

    Per method and MoE configuration (re-initialisation ratio included) run over a grid of D1
    and D2: the dataset law and its baselines per dense size, the joint law and its baseline
    across sizes. Configurations run at a single (D1, D2) pair (the sparsity axis) feed only
    the model-configuration law, which is fitted to the r = 0 runs.
    """
    tasks: list[FitTask] = []
    upcycled = table[table["init"] == "upcycled"]
    if upcycled.empty:
        for law in ("dataset", "joint", "model_config"):
            tasks.append(FitTask(FitKey(law), upcycled, reason="no upcycled runs in the store"))
    for method in sorted(upcycled["method"].unique()):
        runs = upcycled[upcycled["method"] == method]
        for moe in _variants(runs):
            group = _select(table, "upcycled", method, moe)
            if len(group[["d1_tokens", "d2_tokens"]].drop_duplicates()) == 1:
                continue  # a point of the sparsity axis: the model-configuration law's
            context = _variant_context("upcycled", method, moe)
            for size, rows in group.groupby("size"):
                for law in DATASET_FAMILY:
                    tasks.append(
                        FitTask(FitKey(law, method, str(size), moe), rows, _context(rows, size=str(size), **context))
                    )
            for law in JOINT_FAMILY:
                tasks.append(FitTask(FitKey(law, method, moe=moe), group, _context(group, **context)))
        plain = runs[runs["reinit_ratio"] == 0.0]  # the sparsity axis is run at r = 0 only
        if not plain.empty and (method == "moe_upcycle" or plain["sparsity"].nunique() > 1):
            tasks.append(_model_config_task(plain, method))

    dense = table[table["init"] == "dense"]
    tasks.append(
        FitTask(
            FitKey("chinchilla_dense"),
            dense,
            _context(dense, init="dense", method="dense") if not dense.empty else {},
            reason=None if not dense.empty else "no dense runs in the store",
        )
    )

    scratch = table[table["init"] == "scratch"]
    if scratch.empty:
        tasks.append(FitTask(FitKey("chinchilla_scratch"), scratch, reason="no from-scratch runs in the store"))
    for method in sorted(scratch["method"].unique()):
        for moe in _variants(scratch[scratch["method"] == method]):
            group = _select(table, "scratch", method, moe)
            context = _variant_context("scratch", method, moe)
            tasks.append(FitTask(FitKey("chinchilla_scratch", method, moe=moe), group, _context(group, **context)))
            for size, rows in group.groupby("size"):
                tasks.append(
                    FitTask(
                        FitKey("scratch_power", method, str(size), moe), rows, _context(rows, size=str(size), **context)
                    )
                )
    return tasks


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


# what to add to the sweep when a law has too few runs
_HINTS = {
    "model_config": "run other expert counts or top-k at one (D1, D2) pair for every dense size "
    "(the sweep's sparsity axis)",
    "joint": "run at least 3 dense sizes",
    "joint_no_interaction": "run at least 3 dense sizes",
    "chinchilla_dense": "run at least 3 dense sizes",
    "chinchilla_scratch": "run at least 3 sizes",
}


def _fit_task(law: str, data: dict, context: dict, options: dict) -> FitResult:
    """One planned fit (module-level, so a worker process can run it); the dataset law also
    gets its two-step cross-check of alpha3 (:mod:`upcycling.analysis.twostep`)."""
    try:
        result = fit_law(law, data, context=context, **options)
    except ValueError as error:
        hint = f" (to fit it: {_HINTS[law]})" if law in _HINTS else ""
        return FitResult.skipped(law, f"{error}{hint}", context)
    if law == "dataset":
        entry = result.identification.get("alpha3", {})
        joint_alpha3 = {
            "value": result.params["alpha3"],
            "interval": result.interval.get("alpha3"),
            "identified": bool(entry.get("identified", False)),
        }
        result.two_step = two_step(
            data["d1"], data["d2"], data["loss"], huber_delta=options["huber_delta"], joint_alpha3=joint_alpha3
        )
    return result


IRREDUCIBLE = ("free", "shared_dense")
_SHARED_E_LAWS = (*DATASET_FAMILY, *JOINT_FAMILY)


def _shared_irreducible(dense: FitResult | None) -> tuple[dict, dict]:
    """(fit options, context) of the dataset and joint laws under fit.irreducible: shared_dense:
    E held at the dense Chinchilla fit's E, or, where that fit has none, E free and why."""
    if dense is None or not dense.ok or not math.isfinite(dense.params.get("E", math.nan)):
        why = "chinchilla_dense was not fitted" if dense is None else f"chinchilla_dense is {dense.status}"
        note = f"shared_dense requested, but {why} ({dense.reason if dense is not None else ''}): E fitted freely"
        return {}, {"irreducible": "free", "irreducible_requested": "shared_dense", "irreducible_note": note}
    value = float(dense.params["E"])
    why = f"shared with chinchilla_dense (E = {value:.4g}, status {dense.status}; fit.irreducible: shared_dense)"
    context = {"irreducible": "shared_dense", "irreducible_E": value, "irreducible_source": "chinchilla_dense"}
    context["irreducible_source_status"] = dense.status
    return {"held": {"E": (value, why)}}, context


def fit_all(
    ds: xr.Dataset,
    fit_cfg: Mapping[str, Any] | None,
    out_dir: str | Path | None = None,
    workers: int = 1,
    counts: str = "non_embedding",
    monotone: bool = False,
) -> dict[str, FitResult]:
    """Fit every law the store supports; skipped laws keep the reason.

    ``fit_cfg`` is the config's ``fit`` section (``bootstrap``, ``huber_delta``, ``seed``,
    ``irreducible``: free | shared_dense (E of the dataset and joint laws held at the dense
    fit's, recorded in each fit's context), ``token_unit`` (of ``in_unit``); optionally
    ``n_starts``, the grid starts of each fit). ``counts``: the parameter-count
    convention (``PARAMETER_COUNTS``); ``monotone``: the "more data never hurts" prior.
    ``workers`` > 1 fits laws in that many processes (each fit is seeded, so the results do not
    depend on it). Logs each fit as it ends; writes ``<out_dir>/<key>.json`` when given.
    """
    fit_cfg = dict(fit_cfg or {})
    irreducible = str(fit_cfg.get("irreducible", "free"))
    if irreducible not in IRREDUCIBLE:
        raise ValueError(f"fit.irreducible {irreducible!r}: use one of {', '.join(IRREDUCIBLE)}")
    token_unit = str(fit_cfg.get("token_unit", DEFAULT_TOKEN_UNIT))
    if token_unit not in TOKEN_UNITS:
        raise ValueError(f"fit.token_unit {token_unit!r}: use one of {', '.join(TOKEN_UNITS)}")
    options = dict(
        huber_delta=float(fit_cfg.get("huber_delta", DEFAULT_HUBER_DELTA)),
        n_bootstrap=int(fit_cfg.get("bootstrap", 64)),
        seed=int(fit_cfg.get("seed", 0)),
        monotone=bool(monotone),
        token_unit=token_unit,
    )
    if "n_starts" in fit_cfg:  # not a config key: lets tests and quick looks trade care for time
        options["n_starts"] = int(fit_cfg["n_starts"])
    fits: dict[str, FitResult] = {}
    pending = {}
    for task in plan_fits(runs_table(ds, counts)):
        key = str(task.key)
        context = {**task.context, "key": key, "parameter_counts": counts}
        if task.law in _SHARED_E_LAWS:
            context["irreducible"] = irreducible
        if task.reason is not None:
            fits[key] = FitResult.skipped(task.law, task.reason, context)
        else:
            pending[key] = (task.law, law_data(task.rows, task.law), context, options)
    started, total = time.monotonic(), len(fits) + len(pending)

    def done(key: str, result: FitResult) -> None:
        fits[key] = result
        outcome = (
            f"{result.status}, RMSE {result.rmse:.4f} on {result.n_points} runs"
            if result.ok
            else f"skipped: {result.reason}"
        )
        log.info("fit %d/%d %s: %s (%.0f s)", len(fits), total, key, outcome, time.monotonic() - started)

    if irreducible == "shared_dense":  # the dense fit first: its E is held in the others
        dense_key = next((key for key in pending if pending[key][0] == "chinchilla_dense"), None)
        if dense_key is not None:
            done(dense_key, _fit_task(*pending.pop(dense_key)))
        held, shared = _shared_irreducible(fits.get(str(FitKey("chinchilla_dense"))))
        for key, (law, data, context, law_options) in pending.items():
            if law in _SHARED_E_LAWS:
                pending[key] = (law, data, {**context, **shared}, {**law_options, **held})
        for result in fits.values():
            if result.law in _SHARED_E_LAWS:
                result.context.update(shared)
    # the largest fits first, so that the last worker to finish is not the slowest one
    order = sorted(pending, key=lambda key: -get_law(pending[key][0]).n_params * len(pending[key][1]["loss"]))
    if workers > 1 and len(pending) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(_fit_task, *pending[key]): key for key in order}
            for future in as_completed(futures):
                done(futures[future], future.result())
    else:
        for key in order:
            done(key, _fit_task(*pending[key]))
    fits = {key: fits[key] for key in sorted(fits)}
    if out_dir is not None:
        for key, result in fits.items():
            result.save(Path(out_dir) / f"{key}.json")
    return fits


def load_fits(fits_dir: str | Path) -> dict[str, FitResult]:
    """The fits written by :func:`fit_all`, by key."""
    return {path.stem: FitResult.load(path) for path in sorted(Path(fits_dir).glob("*.json"))}
