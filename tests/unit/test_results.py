"""The results store (metrics JSONs -> zarr). The fits and the report on it: test_fitstage.py."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from upcycling.analysis import fitstage
from upcycling.analysis import store as results
from upcycling.core.metrics import MetricsError

CONFIG_TEXT = "fit:\n  bootstrap: 4\n  huber_delta: 1.0e-3\n"


def write_metrics(root, coords, loss, *, n1, n2, n_total, tokens, curve_tokens=None, name=None, fingerprint=None):
    """One metrics JSON as the trainer writes it (docs/contracts.md)."""
    curve_tokens = curve_tokens if curve_tokens is not None else [tokens // 2, tokens]
    run_id = name or "/".join(str(value) for value in coords.values())
    path = root / run_id / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format_version": 2,
        "run_id": run_id,
        "job": f"job[{run_id}]",
        "coords": coords,
        "n_params": n_total,
        "active_params": n2,
        "dense_params": n1,
        "non_embedding_params": n_total // 2,
        "active_non_embedding_params": n2 // 2,
        "dense_non_embedding_params": n1 // 2,
        "final_val_loss": loss,
        "tokens_seen": tokens,
        "flops": 6.0 * n2 * tokens,
        "wall_time_s": 1.5,
        "curve": {
            "tokens": list(curve_tokens),
            "val_loss": [loss + 0.1 * (len(curve_tokens) - i) for i in range(len(curve_tokens))],
        },
        "train_curve": {"tokens": [], "loss": []},
        "expert_load": None,
        "model": {},
        "training": {},
        "moe": None,
        "processes": 1,
        "precision": "fp32",
        "device": "cpu",
        "spec_sha256": fingerprint or "0" * 64,
        "checkpoint_fingerprint": "test",
        "code_version": "test",
    }
    path.write_text(json.dumps(payload))
    return path


def coords(size, init, d1, d2, experts=4, top_k=2, granularity=1, seed=0):
    if init == "dense":
        experts, top_k = 1, 1
    method = "dense" if init == "dense" else "moe_upcycle"
    return dict(
        size=size,
        init=init,
        method=method,
        seed=seed,
        d1_tokens=d1,
        d2_tokens=d2,
        experts=experts,
        top_k=top_k,
        granularity=granularity,
    )


# ---- aggregate ------------------------------------------------------------------------------


def small_sweep(root):
    paths = []
    for d1 in (1000, 2000):
        paths.append(
            write_metrics(
                root,
                coords("xs", "dense", d1, 0),
                5.0 - d1 / 1e4,
                n1=100,
                n2=100,
                n_total=100,
                tokens=d1,
                curve_tokens=[250, 500, d1],
            )
        )
        for d2 in (1000, 3000):
            paths.append(
                write_metrics(
                    root, coords("xs", "upcycled", d1, d2), 4.0 - d2 / 1e4, n1=100, n2=130, n_total=250, tokens=d2
                )
            )
    paths.append(
        write_metrics(
            root,
            coords("s", "scratch", 0, 3000),
            4.5,
            n1=130,
            n2=130,
            n_total=250,
            tokens=3000,
            curve_tokens=[700, 3000],
        )
    )
    return paths


def test_aggregate_round_trip(tmp_path):
    paths = small_sweep(tmp_path / "runs")
    store = tmp_path / "losses.zarr"
    results.aggregate(paths, store, CONFIG_TEXT, "0.1.0+test")
    ds = xr.open_zarr(store)  # as a user opens it
    assert list(ds["final_val_loss"].dims) == list(results.COORDS)
    assert ds["curve_val_loss"].dims[-1] == "curve_tokens"
    assert ds.attrs["config"] == CONFIG_TEXT and ds.attrs["code_version"] == "0.1.0+test"

    curve_union = sorted({t for p in paths for t in json.loads(p.read_text())["curve"]["tokens"]})
    assert ds["curve_tokens"].values.tolist() == curve_union
    for path in paths:
        payload = json.loads(path.read_text())
        at = ds.sel({**results.COORD_DEFAULTS, **payload["coords"]})
        for name in results.SCALARS:
            assert float(at[name]) == pytest.approx(payload[name]), (path, name)
        curve = at["curve_val_loss"].to_series()
        expected = dict(zip(payload["curve"]["tokens"], payload["curve"]["val_loss"]))
        for token, value in curve.items():
            if token in expected:
                assert value == pytest.approx(expected[token])
            else:
                assert math.isnan(value)
    # combinations that were not run are NaN
    assert np.isnan(float(ds["final_val_loss"].sel(coords("xs", "scratch", 0, 3000) | {"reinit_ratio": 0.0})))
    assert np.isnan(float(ds["final_val_loss"].sel(coords("s", "upcycled", 1000, 1000) | {"reinit_ratio": 0.0})))
    assert int(np.isfinite(ds["final_val_loss"]).sum()) == len(paths)

    table = fitstage.runs_table(results.load_losses(store), counts="total")
    assert len(table) == len(paths)
    upcycled = fitstage.select_runs(table, "upcycled", size="xs", experts=4)
    data = fitstage.law_data(upcycled, "dataset")
    assert sorted(data) == ["d1", "d2", "loss"] and data["loss"].size == 4
    assert np.allclose(upcycled["sparsity"], 250 / 130)
    non_embedding = fitstage.runs_table(results.load_losses(store))
    assert np.allclose(fitstage.select_runs(non_embedding, "upcycled")["sparsity"], 125 / 65)


def test_aggregate_replaces_an_existing_store(tmp_path):
    store = tmp_path / "losses.zarr"
    first = small_sweep(tmp_path / "a")
    results.aggregate(first, store, CONFIG_TEXT, "v1")
    second = [write_metrics(tmp_path / "b", coords("m", "dense", 4000, 0), 3.0, n1=9, n2=9, n_total=9, tokens=4000)]
    results.aggregate(second, store, CONFIG_TEXT, "v2")
    ds = results.load_losses(store)
    assert ds.attrs["code_version"] == "v2"
    assert ds["size"].values.tolist() == ["m"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "losses.zarr"]


def test_missing_coordinate_names_the_file(tmp_path):
    paths = small_sweep(tmp_path / "runs")
    broken = write_metrics(
        tmp_path / "runs", coords("xs", "upcycled", 5000, 1000), 3.9, n1=1, n2=1, n_total=1, tokens=1000, name="broken"
    )
    payload = json.loads(broken.read_text())
    del payload["coords"]["d2_tokens"]
    broken.write_text(json.dumps(payload))
    with pytest.raises(MetricsError, match=rf"{broken}.*coords.*d2_tokens"):
        results.aggregate(paths + [broken], tmp_path / "losses.zarr", CONFIG_TEXT, "x")
    assert not (tmp_path / "losses.zarr").exists()


def test_aggregate_refuses_a_run_made_by_other_settings(tmp_path):
    """A metrics file whose spec fingerprint is not the one the sweep expects (a stale run left by
    other settings) is refused, naming the file, and no store is written."""
    paths = small_sweep(tmp_path / "runs")
    expected = {str(path): "0" * 64 for path in paths}
    results.aggregate(expected, tmp_path / "ok.zarr", CONFIG_TEXT, "x")  # every fingerprint as expected
    stale = paths[1]
    expected[str(stale)] = "1" * 64
    with pytest.raises(MetricsError, match=rf"{stale}: made by other settings"):
        results.aggregate(expected, tmp_path / "losses.zarr", CONFIG_TEXT, "x")
    assert not (tmp_path / "losses.zarr").exists()


def test_the_contract_documents_every_field_of_the_metrics_schema():
    """docs/contracts.md names every property of the schema that the trainer writes against."""
    from upcycling.core.metrics import schema

    contract = (Path(__file__).parents[2] / "docs" / "contracts.md").read_text()
    properties = schema()["properties"]
    for name in [*properties, *properties["coords"]["properties"]]:
        assert f'"{name}"' in contract, name


def test_duplicate_coordinates_name_both_files(tmp_path):
    paths = small_sweep(tmp_path / "runs")
    twin = write_metrics(
        tmp_path / "runs", coords("xs", "dense", 1000, 0), 4.0, n1=100, n2=100, n_total=100, tokens=1000, name="twin"
    )
    with pytest.raises(MetricsError, match=rf"duplicate.*{paths[0]}.*{twin}"):
        results.aggregate(paths + [twin], tmp_path / "losses.zarr", CONFIG_TEXT, "x")


def test_malformed_metrics_are_errors(tmp_path):
    path = write_metrics(tmp_path, coords("xs", "dense", 1000, 0), 4.0, n1=1, n2=1, n_total=1, tokens=1000)
    payload = json.loads(path.read_text())
    payload["final_val_loss"] = None
    path.write_text(json.dumps(payload))
    with pytest.raises(MetricsError, match=rf"{path}.*final_val_loss"):
        results.read_metrics(path)
    path.write_text("{not json")
    with pytest.raises(MetricsError, match=str(path)):
        results.read_metrics(path)
