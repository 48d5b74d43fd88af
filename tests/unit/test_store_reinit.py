"""The results store's Drop-Upcycling coordinate and its record of what the experts do
(upcycling.analysis.store): ``reinit_ratio``, ``expert_similarity``, ``expert_load_max``,
``expert_load``."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import xarray as xr

from upcycling.analysis import store as results

from .test_results import CONFIG_TEXT, coords, write_metrics


def _with(path, **changes):
    """Rewrite one metrics file with some keys changed (as the trainer of today writes them)."""
    payload = json.loads(path.read_text())
    for key, value in changes.items():
        if key == "reinit_ratio":
            payload["coords"]["reinit_ratio"] = value
        else:
            payload[key] = value
    path.write_text(json.dumps(payload))
    return path


def _runs(root):
    """A dense run, an upcycled run from before this record existed, and r = 0 / r = 0.5 runs."""
    dense = write_metrics(root, coords("xs", "dense", 1000, 0), 5.0, n1=100, n2=100, n_total=100, tokens=1000)
    old = write_metrics(root, coords("xs", "upcycled", 1000, 2000), 4.3, n1=100, n2=130, n_total=250, tokens=2000)
    plain = write_metrics(
        root, coords("xs", "upcycled", 1000, 3000), 4.2, n1=100, n2=130, n_total=250, tokens=3000, name="plain"
    )
    _with(plain, expert_similarity=[0.9, 0.7], expert_load=[[0.5, 0.5], [0.2, 0.8]])
    dropped = write_metrics(
        root, coords("xs", "upcycled", 1000, 3000), 4.1, n1=100, n2=130, n_total=250, tokens=3000, name="dropped"
    )
    _with(dropped, reinit_ratio=0.5, expert_similarity=[0.4, 0.2], expert_load=[[0.6, 0.4], [0.7, 0.3]])
    return dense, old, plain, dropped


def test_the_store_has_the_reinit_coordinate_after_granularity_and_the_expert_summaries(tmp_path):
    paths = _runs(tmp_path / "runs")
    results.aggregate(paths, tmp_path / "losses.zarr", CONFIG_TEXT, "test")
    ds = xr.open_zarr(tmp_path / "losses.zarr")
    dims = list(ds["final_val_loss"].dims)
    assert dims[dims.index("granularity") + 1] == "reinit_ratio"
    assert ds["reinit_ratio"].values.tolist() == [0.0, 0.5]
    upcycled = {"size": "xs", "init": "upcycled", "method": "moe_upcycle", "seed": 0, "d1_tokens": 1000}
    at = {**upcycled, "d2_tokens": 3000, "experts": 4, "top_k": 2, "granularity": 1}
    plain, dropped = ds.sel(at | {"reinit_ratio": 0.0}), ds.sel(at | {"reinit_ratio": 0.5})
    assert float(plain["final_val_loss"]) == 4.2 and float(dropped["final_val_loss"]) == 4.1
    assert float(plain["expert_similarity"]) == pytest.approx(0.8)
    assert float(dropped["expert_similarity"]) == pytest.approx(0.3)
    assert float(plain["expert_load_max"]) == pytest.approx(0.65)
    assert float(dropped["expert_load_max"]) == pytest.approx(0.65)
    # r = 0.5 was not run at D2 = 2000: NaN there, as for any combination not run.
    assert math.isnan(float(ds["final_val_loss"].sel(at | {"d2_tokens": 2000, "reinit_ratio": 0.5})))


def test_the_per_layer_expert_load_round_trips_from_metrics_json_to_the_store_on_disk(tmp_path):
    dense, old, plain, dropped = _runs(tmp_path / "runs")
    # a run with three layers of three experts: the others are NaN-padded to its shape
    wide = write_metrics(
        tmp_path / "runs", coords("xs", "upcycled", 1000, 3000, experts=3, top_k=1), 4.0,
        n1=100, n2=130, n_total=250, tokens=3000, name="wide",
    )  # fmt: skip
    wide_load = [[0.2, 0.3, 0.5], [0.1, 0.1, 0.8], [0.4, 0.4, 0.2]]
    _with(wide, expert_similarity=[0.5, 0.5, 0.5], expert_load=wide_load)
    results.aggregate([dense, old, plain, dropped, wide], tmp_path / "losses.zarr", CONFIG_TEXT, "test")
    ds = xr.open_zarr(tmp_path / "losses.zarr")
    load = ds["expert_load"]
    assert load.dims == (*results.COORDS, "moe_layer", "expert")
    assert ds["moe_layer"].values.tolist() == [0, 1, 2] and ds["expert"].values.tolist() == [0, 1, 2]
    upcycled = {"size": "xs", "init": "upcycled", "method": "moe_upcycle", "seed": 0, "d1_tokens": 1000}
    at = {**upcycled, "d2_tokens": 3000, "experts": 4, "top_k": 2, "granularity": 1}
    for ratio, path in ((0.0, plain), (0.5, dropped)):
        written = json.loads(path.read_text())["expert_load"]
        stored = load.sel(at | {"reinit_ratio": ratio}).values
        np.testing.assert_array_equal(stored[:2, :2], np.array(written))
        assert np.isnan(stored[2:, :]).all() and np.isnan(stored[:, 2:]).all()  # fewer layers and experts
    stored = load.sel(at | {"experts": 3, "top_k": 1, "reinit_ratio": 0.0}).values
    np.testing.assert_array_equal(stored, np.array(wide_load))
    dense_at = {"size": "xs", "init": "dense", "method": "dense", "d2_tokens": 0}
    assert np.isnan(load.sel(dense_at, drop=True).values).all()  # dense runs have no experts
    assert np.isnan(load.sel(at | {"d2_tokens": 2000, "reinit_ratio": 0.0}).values).all()  # expert_load null
    # the summary variables are still there beside it
    assert float(ds["expert_load_max"].sel(at | {"reinit_ratio": 0.5})) == pytest.approx(0.65)


def test_metrics_without_the_new_keys_still_aggregate(tmp_path):
    dense, old, *_ = _runs(tmp_path / "runs")
    ds = results.aggregate([dense, old], tmp_path / "losses.zarr", CONFIG_TEXT, "test")
    assert ds["reinit_ratio"].values.tolist() == [0.0]  # an old run is plain upcycling
    assert np.isnan(ds["expert_similarity"].values).all()
    assert np.isnan(ds["expert_load_max"].values).all()  # the old run's metrics have expert_load null
    assert ds["expert_load"].sizes["moe_layer"] == ds["expert_load"].sizes["expert"] == 0
    reopened = xr.open_zarr(tmp_path / "losses.zarr")  # no run with a load: empty dimensions, still readable
    assert reopened["expert_load"].shape[-2:] == (0, 0) and float(reopened["final_val_loss"].max()) == 5.0
    record = results.read_metrics(old)
    assert record["coords"]["reinit_ratio"] == 0.0 and math.isnan(record["expert_similarity"])


def test_the_same_run_at_two_ratios_is_two_runs_but_a_repeat_is_refused(tmp_path):
    _, _, plain, dropped = _runs(tmp_path / "runs")
    results.build_dataset([results.read_metrics(plain), results.read_metrics(dropped)], CONFIG_TEXT, "test")
    again = tmp_path / "again.json"
    again.write_text(dropped.read_text())
    with pytest.raises(results.MetricsError, match="reinit_ratio=0.5"):
        results.build_dataset([results.read_metrics(dropped), results.read_metrics(again)], CONFIG_TEXT, "test")
