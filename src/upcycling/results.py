"""The results store: every run's metrics JSON gathered into one xarray Dataset (zarr).

Public functions:

- ``read_metrics(path) -> dict``: one metrics JSON, validated (ValueError naming the file)
- ``build_dataset(records, config_text, code_version) -> xr.Dataset``: records -> Dataset
- ``aggregate(metrics_paths, out_zarr, config_text, code_version) -> xr.Dataset``: read,
  build, write atomically (temporary store next to ``out_zarr``, then rename)
- ``write_store(ds, out_zarr) -> Path``: the atomic write on its own
- ``load_losses(path) -> xr.Dataset``: ``xarray.open_zarr``

The store as a tidy table of runs, for the fits: :mod:`upcycling.fitstage`.

Layout (docs/contracts.md): dimensions ``size, init, method, seed, d1_tokens, d2_tokens,
experts, top_k, granularity`` (NaN where a combination was not run); scalar variables
``final_val_loss, flops, n_params, active_params, dense_params, non_embedding_params,
active_non_embedding_params, dense_non_embedding_params, tokens_seen, wall_time_s``;
``curve_val_loss`` over the extra ``curve_tokens`` dimension (the union of every run's curve
positions, NaN elsewhere); attributes ``config`` (YAML text) and ``code_version``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

__all__ = [
    "COORDS",
    "SCALARS",
    "aggregate",
    "build_dataset",
    "load_losses",
    "read_metrics",
    "write_store",
]

FORMAT_VERSION = 1
# coordinate -> Python type of its values (strings are labels, the rest integers)
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
}
SCALARS = ("final_val_loss", "flops", "n_params", "active_params", "dense_params",
           "non_embedding_params", "active_non_embedding_params", "dense_non_embedding_params",
           "tokens_seen", "wall_time_s")
INITS = ("dense", "upcycled", "scratch")
# Second-stage methods ("dense" for the dense runs themselves); see docs/contracts.md.
METHODS = ("dense", "moe_upcycle", "continue", "grow_depth", "grow_width")


# --------------------------------------------------------------------------------------------
# Reading metrics files
# --------------------------------------------------------------------------------------------


def _coordinate(value: Any, kind: type) -> Any:
    """The coordinate as ``kind``, or None when it is missing or of the wrong type."""
    if value is None or isinstance(value, bool):
        return None
    if kind is str:
        return value if isinstance(value, str) and value else None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _number(value: Any) -> float:
    if value is None or isinstance(value, bool):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def read_metrics(path: str | Path) -> dict[str, Any]:
    """One run's metrics JSON as ``{"path", "coords", <scalars>, "curve_tokens",
    "curve_val_loss"}``. ValueError naming the file when it is unreadable, lacks (or has
    malformed) coordinates, or has no final validation loss."""
    path = Path(path)
    try:
        payload = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: cannot read metrics JSON ({error})") from error
    if not isinstance(payload, dict):
        raise ValueError(f"{path}: metrics JSON is not an object")
    version = payload.get("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {version!r}, expected {FORMAT_VERSION}")
    raw = payload.get("coords")
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: no 'coords' object (needs {', '.join(COORDS)})")
    coords = {name: _coordinate(raw.get(name), kind) for name, kind in COORDS.items()}
    missing = [name for name, value in coords.items() if value is None]
    if missing:
        raise ValueError(f"{path}: missing or malformed coordinates: {', '.join(missing)}")
    if coords["init"] not in INITS:
        raise ValueError(f"{path}: coordinate init={coords['init']!r} is not one of {INITS}")
    if coords["method"] not in METHODS:
        raise ValueError(f"{path}: coordinate method={coords['method']!r} is not one of {METHODS}")
    record: dict[str, Any] = {"path": str(path), "coords": coords}
    for name in SCALARS:
        record[name] = _number(payload.get(name))
    if not math.isfinite(record["final_val_loss"]):
        raise ValueError(f"{path}: final_val_loss is missing or not a finite number")
    curve = payload.get("curve") or {}
    tokens = curve.get("tokens") or []
    losses = curve.get("val_loss") or []
    if len(tokens) != len(losses):
        raise ValueError(f"{path}: curve.tokens ({len(tokens)}) and curve.val_loss "
                         f"({len(losses)}) differ in length")
    record["curve_tokens"] = np.asarray(tokens, dtype=np.int64)
    record["curve_val_loss"] = np.asarray([_number(v) for v in losses], dtype=float)
    return record


# --------------------------------------------------------------------------------------------
# Building and writing the Dataset
# --------------------------------------------------------------------------------------------


def _coordinate_values(name: str, values: Iterable[Any]) -> np.ndarray:
    unique = sorted(set(values))
    if COORDS[name] is str:
        # object arrays are stored as zarr variable-length strings (no unstable-dtype warning)
        return np.array(unique, dtype=object)
    return np.array(unique, dtype=np.int64)


def build_dataset(records: list[Mapping[str, Any]], config_text: str,
                  code_version: str) -> xr.Dataset:
    """The results Dataset from records of :func:`read_metrics` (pure: no I/O).

    ValueError naming both files when two records share a coordinate tuple.
    """
    seen: dict[tuple, str] = {}
    for record in records:
        key = tuple(record["coords"][name] for name in COORDS)
        if key in seen:
            described = ", ".join(f"{n}={v}" for n, v in zip(COORDS, key))
            raise ValueError(f"duplicate run coordinates ({described}) in {seen[key]} and "
                             f"{record['path']}")
        seen[key] = record["path"]

    coords = {name: _coordinate_values(name, (r["coords"][name] for r in records))
              for name in COORDS}
    curve_tokens = np.array(sorted({int(t) for r in records for t in r["curve_tokens"]}),
                            dtype=np.int64)
    positions = {name: {value: i for i, value in enumerate(values)}
                 for name, values in coords.items()}
    curve_position = {token: i for i, token in enumerate(curve_tokens)}
    shape = tuple(len(values) for values in coords.values())

    scalars = {name: np.full(shape, np.nan) for name in SCALARS}
    curves = np.full((*shape, len(curve_tokens)), np.nan)
    for record in records:
        index = tuple(positions[name][record["coords"][name]] for name in COORDS)
        for name in SCALARS:
            scalars[name][index] = record[name]
        columns = [curve_position[int(t)] for t in record["curve_tokens"]]
        curves[index + (columns,)] = record["curve_val_loss"]

    dims = tuple(COORDS)
    data_vars = {name: (dims, values) for name, values in scalars.items()}
    data_vars["curve_val_loss"] = ((*dims, "curve_tokens"), curves)
    return xr.Dataset(
        data_vars,
        coords={**coords, "curve_tokens": curve_tokens},
        attrs={"config": config_text, "code_version": code_version,
               "format_version": FORMAT_VERSION, "n_runs": len(records)},
    )


def write_store(ds: xr.Dataset, out_zarr: str | Path) -> Path:
    """Write ``ds`` to a temporary store next to ``out_zarr``, then rename it into place.

    An existing store is moved aside only once the new one is complete, and deleted last, so
    a crash never leaves a half-written store under the final name.
    """
    out_zarr = Path(out_zarr)
    out_zarr.parent.mkdir(parents=True, exist_ok=True)
    temporary = out_zarr.with_name(f".{out_zarr.name}.tmp-{os.getpid()}")
    previous = out_zarr.with_name(f".{out_zarr.name}.old-{os.getpid()}")
    for leftover in (temporary, previous):
        if leftover.exists():
            shutil.rmtree(leftover)
    with warnings.catch_warnings():
        # Consolidated metadata is an extension of zarr v3 (hence zarr's warning); readers that do
        # not know it read the per-array metadata, and a plain `xarray.open_zarr(path)` opens the
        # store at once and without a warning.
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        ds.to_zarr(temporary, mode="w", consolidated=True)
    if out_zarr.exists():
        os.replace(out_zarr, previous)
    os.replace(temporary, out_zarr)
    if previous.exists():
        shutil.rmtree(previous)
    return out_zarr


def aggregate(metrics_paths: Iterable[str | Path], out_zarr: str | Path, config_text: str,
              code_version: str) -> xr.Dataset:
    """Read every metrics JSON, build the results Dataset and write it to ``out_zarr``.

    ValueError naming the file(s) for a file without its coordinates, or two files with the
    same coordinate tuple.
    """
    records = [read_metrics(path) for path in metrics_paths]
    if not records:
        raise ValueError("aggregate: no metrics files given")
    ds = build_dataset(records, config_text, code_version)
    write_store(ds, out_zarr)
    return ds


def load_losses(path: str | Path) -> xr.Dataset:
    """The results store at ``path`` (lazily loaded with xarray.open_zarr)."""
    with warnings.catch_warnings():
        # Snakemake marks a directory() output with a .snakemake_timestamp file inside it.
        warnings.filterwarnings("ignore", message=".*snakemake_timestamp.*")
        return xr.open_zarr(path)

