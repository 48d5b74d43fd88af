"""The results store: every run's metrics JSON gathered into one xarray Dataset (zarr).

Public functions:

- ``read_metrics(path, expected_fingerprint=None) -> dict``: one metrics JSON, validated
  against the metrics schema (MetricsError naming the file)
- ``build_dataset(records, config_text, code_version) -> xr.Dataset``: records -> Dataset
- ``aggregate(metrics_paths, out_zarr, config_text, code_version) -> xr.Dataset``: read,
  build, write atomically (temporary store next to ``out_zarr``, then rename)
- ``write_store(ds, out_zarr) -> Path``: the atomic write on its own
- ``load_losses(path) -> xr.Dataset``: ``xarray.open_zarr``

The store as a tidy table of runs, for the fits: :mod:`upcycling.analysis.fitstage`.

Layout (docs/contracts.md): dimensions ``size, init, method, seed, d1_tokens, d2_tokens,
experts, top_k, granularity, reinit_ratio`` (NaN where a combination was not run); scalar variables
``final_val_loss, flops, n_params, active_params, dense_params, non_embedding_params,
active_non_embedding_params, dense_non_embedding_params, tokens_seen, wall_time_s`` and, of what
the experts do, ``expert_similarity, expert_load_max`` (NaN for dense runs and older metrics);
``expert_load``, the per-layer share of tokens of each expert, over the extra ``moe_layer`` and
``expert`` dimensions (0-based; as many as the run with the most; NaN beyond a run's own and for
dense runs and older metrics; absent from stores written before it); ``curve_val_loss`` over the
extra ``curve_tokens`` dimension (the union of every run's curve positions, NaN elsewhere);
attributes ``config`` (YAML text) and ``code_version``.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from upcycling.core.metrics import FORMAT_VERSION, MetricsError, validate
from upcycling.core.publish import staging_dir

__all__ = [
    "COORDS",
    "COORD_DEFAULTS",
    "EXPERT_LOAD",
    "EXPERT_LOAD_DIMS",
    "EXPERT_SUMMARIES",
    "SCALARS",
    "aggregate",
    "build_dataset",
    "load_losses",
    "read_metrics",
    "write_store",
]

# coordinate -> Python type of its values (strings are labels, reinit_ratio a number, the rest integers)
COORDS: dict[str, type] = {
    "size": str,
    "init": str,
    "method": str,
    "seed": int,
    "d1_tokens": int,
    "d2_tokens": int,
    "experts": int,
    "top_k": int,
    "granularity": int,
    "reinit_ratio": float,
}
# The value of a coordinate that a run's metrics leave out: runs from before it, and runs it does not apply to.
COORD_DEFAULTS: dict[str, Any] = {"reinit_ratio": 0.0}
SCALARS = (
    "final_val_loss",
    "flops",
    "n_params",
    "active_params",
    "dense_params",
    "non_embedding_params",
    "active_non_embedding_params",
    "dense_non_embedding_params",
    "tokens_seen",
    "wall_time_s",
)
# Per-run summaries of the experts, from the metrics' per-layer lists (NaN for dense runs and for
# metrics written before expert_similarity existed): the mean over layers of the pairwise cosine
# similarity of the experts' weights, and of the largest share of tokens any expert got.
EXPERT_SUMMARIES = ("expert_similarity", "expert_load_max")
# The per-layer, per-expert share of tokens itself (the metrics' ``expert_load``), over two extra
# dimensions; a store written before it lacks the variable (readers check ``EXPERT_LOAD in ds``).
EXPERT_LOAD = "expert_load"
EXPERT_LOAD_DIMS = ("moe_layer", "expert")


# --------------------------------------------------------------------------------------------
# Reading metrics files
# --------------------------------------------------------------------------------------------


def read_metrics(path: str | Path, expected_fingerprint: str | None = None) -> dict[str, Any]:
    """One run's metrics JSON as ``{"path", "coords", <scalars>, <expert summaries>, "expert_load",
    "curve_tokens", "curve_val_loss"}`` (``expert_load``: a layers x experts array, None for dense
    runs and older metrics), validated against the metrics schema (upcycling.core.metrics). MetricsError
    naming the file: unreadable, not following the schema, or (``expected_fingerprint``) made by
    a job spec other than the one the current sweep expects there."""
    path = Path(path)
    try:
        payload = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise MetricsError(f"{path}: cannot read metrics JSON ({error}): rerun the job that writes it") from error
    validate(payload, str(path))
    implausible_loss(payload, path)
    if expected_fingerprint is not None and payload["spec_sha256"] != expected_fingerprint:
        raise MetricsError(
            f"{path}: made by other settings than the current sweep's (its spec fingerprint differs): a store "
            "must not mix runs of different settings at one coordinate; rerun snakemake, which redoes this run"
        )
    record: dict[str, Any] = {"path": str(path), "coords": {**COORD_DEFAULTS, **payload["coords"]}}
    for name in SCALARS:
        record[name] = float(payload[name])
    record.update(expert_summaries(payload.get("expert_similarity"), payload.get("expert_load")))
    record[EXPERT_LOAD] = expert_load_table(payload.get("expert_load"))
    curve = payload["curve"]
    if len(curve["tokens"]) != len(curve["val_loss"]):
        raise MetricsError(
            f"{path}: curve.tokens ({len(curve['tokens'])}) and curve.val_loss "
            f"({len(curve['val_loss'])}) differ in length"
        )
    record["curve_tokens"] = np.asarray(curve["tokens"], dtype=np.int64)
    record["curve_val_loss"] = np.asarray(curve["val_loss"], dtype=float)
    return record


def implausible_loss(payload: Mapping[str, Any], path: str | Path) -> None:
    """MetricsError naming the file and the field of a loss that no training run gives: a
    cross-entropy is a finite number >= 0 (the schema checks only that it is a number)."""
    losses = [("final_val_loss", payload["final_val_loss"])]
    losses += [(f"curve.val_loss[{i}]", value) for i, value in enumerate(payload["curve"]["val_loss"])]
    train_curve = payload.get("train_curve") or {}
    losses += [(f"train_curve.loss[{i}]", value) for i, value in enumerate(train_curve.get("loss", []))]
    for field, value in losses:
        if not (math.isfinite(value) and value >= 0):
            raise MetricsError(
                f"{path}: {field} is {value}, but a cross-entropy loss is a finite number >= 0: the file is "
                "corrupt or was edited; rerun the job that writes it (delete the file, then snakemake)"
            )


def expert_summaries(similarity: Sequence[float] | None, load: Sequence[Sequence[float]] | None) -> dict[str, float]:
    """The run's EXPERT_SUMMARIES from its per-layer ``expert_similarity`` and ``expert_load``
    (either None: NaN)."""
    return {
        "expert_similarity": float(np.mean(similarity)) if similarity else math.nan,
        "expert_load_max": float(np.mean([max(layer) for layer in load])) if load else math.nan,
    }


def expert_load_table(load: Sequence[Sequence[float]] | None) -> np.ndarray | None:
    """The metrics' per-layer ``expert_load`` as a layers x experts array (a layer with fewer
    experts than another NaN-padded); None where there is none (dense runs, older metrics)."""
    if not load:
        return None
    table = np.full((len(load), max(len(layer) for layer in load)), np.nan)
    for index, layer in enumerate(load):
        table[index, : len(layer)] = layer
    return table


# --------------------------------------------------------------------------------------------
# Building and writing the Dataset
# --------------------------------------------------------------------------------------------


def _coordinate(record: Mapping[str, Any], name: str) -> Any:
    """A record's value of a coordinate (its default where the record has none), as COORDS types it."""
    return COORDS[name](record["coords"].get(name, COORD_DEFAULTS.get(name)))


def _coordinate_values(name: str, values: Iterable[Any]) -> np.ndarray:
    unique = sorted(set(values))
    if COORDS[name] is str:
        # object arrays are stored as zarr variable-length strings (no unstable-dtype warning)
        return np.array(unique, dtype=object)
    return np.array(unique, dtype=np.float64 if COORDS[name] is float else np.int64)


def build_dataset(records: Sequence[Mapping[str, Any]], config_text: str, code_version: str) -> xr.Dataset:
    """The results Dataset from records of :func:`read_metrics` (pure: no I/O).

    ValueError naming both files when two records share a coordinate tuple.
    """
    seen: dict[tuple, str] = {}
    for record in records:
        key = tuple(_coordinate(record, name) for name in COORDS)
        if key in seen:
            described = ", ".join(f"{n}={v}" for n, v in zip(COORDS, key))
            raise MetricsError(
                f"duplicate run coordinates ({described}) in {seen[key]} and {record['path']}: remove the stale one"
            )
        seen[key] = record["path"]

    coords = {name: _coordinate_values(name, (_coordinate(r, name) for r in records)) for name in COORDS}
    curve_tokens = np.array(sorted({int(t) for r in records for t in r["curve_tokens"]}), dtype=np.int64)
    positions = {name: {value: i for i, value in enumerate(values)} for name, values in coords.items()}
    curve_position = {token: i for i, token in enumerate(curve_tokens)}
    shape = tuple(len(values) for values in coords.values())

    scalars = {name: np.full(shape, np.nan) for name in (*SCALARS, *EXPERT_SUMMARIES)}
    curves = np.full((*shape, len(curve_tokens)), np.nan)
    tables = [r.get(EXPERT_LOAD) for r in records]
    load_shape = tuple(max((t.shape[axis] for t in tables if t is not None), default=0) for axis in (0, 1))
    load = np.full((*shape, *load_shape), np.nan)
    for record in records:
        index = tuple(positions[name][_coordinate(record, name)] for name in COORDS)
        for name in SCALARS:
            scalars[name][index] = record[name]
        for name in EXPERT_SUMMARIES:
            scalars[name][index] = record.get(name, np.nan)
        table = record.get(EXPERT_LOAD)
        if table is not None:
            load[index + (slice(table.shape[0]), slice(table.shape[1]))] = table
        columns = [curve_position[int(t)] for t in record["curve_tokens"]]
        curves[index + (columns,)] = record["curve_val_loss"]

    dims = tuple(COORDS)
    data_vars = {name: (dims, values) for name, values in scalars.items()}
    data_vars[EXPERT_LOAD] = ((*dims, *EXPERT_LOAD_DIMS), load)
    data_vars["curve_val_loss"] = ((*dims, "curve_tokens"), curves)
    load_coords = {name: np.arange(size, dtype=np.int64) for name, size in zip(EXPERT_LOAD_DIMS, load_shape)}
    return xr.Dataset(
        data_vars,
        coords={**coords, **load_coords, "curve_tokens": curve_tokens},
        attrs={
            "config": config_text,
            "code_version": code_version,
            "format_version": FORMAT_VERSION,
            "n_runs": len(records),
        },
    )


def write_store(ds: xr.Dataset, out_zarr: str | Path) -> Path:
    """Write ``ds`` to a staged store next to ``out_zarr`` and publish it there atomically: a
    crash never leaves a half-written store under the final name."""
    with staging_dir(out_zarr) as staged, warnings.catch_warnings():
        # Consolidated metadata is an extension of zarr v3 (hence zarr's warning); readers that do
        # not know it read the per-array metadata, and a plain `xarray.open_zarr(path)` opens the
        # store at once and without a warning.
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        ds.to_zarr(staged, mode="w", consolidated=True)
    return Path(out_zarr)


def aggregate(
    metrics_paths: Iterable[str | Path] | Mapping[str, str], out_zarr: str | Path, config_text: str, code_version: str
) -> xr.Dataset:
    """Read every metrics JSON, build the results Dataset and write it to ``out_zarr``.

    ``metrics_paths``: the files, or a mapping file -> the spec fingerprint the sweep expects of
    it (what the aggregate rule passes). MetricsError naming the file(s) for a file that breaks
    the contract, was made by other settings, or shares its coordinates with another file.
    """
    expected = dict(metrics_paths) if isinstance(metrics_paths, Mapping) else dict.fromkeys(metrics_paths)
    records = [read_metrics(path, fingerprint) for path, fingerprint in expected.items()]
    if not records:
        raise MetricsError("aggregate: no metrics files given: the sweep has no runs")
    ds = build_dataset(records, config_text, code_version)
    write_store(ds, out_zarr)
    return ds


def load_losses(path: str | Path) -> xr.Dataset:
    """The results store at ``path`` (lazily loaded with xarray.open_zarr)."""
    with warnings.catch_warnings():
        # Snakemake marks a directory() output with a .snakemake_timestamp file inside it.
        warnings.filterwarnings("ignore", message=".*snakemake_timestamp.*")
        return xr.open_zarr(path)
