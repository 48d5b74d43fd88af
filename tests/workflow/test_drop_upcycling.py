"""config/drop_upcycling.yaml end to end: plain sparse upcycling (r = 0) and Drop-Upcycling (r = 0.5)
from the same dense checkpoints through the whole DAG; the store has an r coordinate and the
experts' similarity, the r = 0.5 experts start more different, and the report compares the two."""

from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr

from tiny_sweep import REPO_CONFIG_TIMEOUT_S, read_json, run_repo_config

# The whole shipped config runs in the first test's set-up (pytest-timeout counts it).
pytestmark = pytest.mark.timeout(REPO_CONFIG_TIMEOUT_S)


@pytest.fixture(scope="module")
def drop_upcycling(tmp_path_factory):
    return run_repo_config(tmp_path_factory.mktemp("drop_upcycling"), "drop_upcycling")


def test_both_ratios_train_from_the_same_dense_checkpoints(drop_upcycling):
    store = xr.open_zarr(drop_upcycling / "losses.zarr")
    assert sorted(store["reinit_ratio"].values.tolist()) == [0.0, 0.5]
    upcycled = store["final_val_loss"].sel(init="upcycled")
    for ratio in (0.0, 0.5):
        assert int(np.isfinite(upcycled.sel(reinit_ratio=ratio).values).sum()) == 9, ratio  # 3 D1 x 3 D2
    # r = 0 keeps plain upcycling's paths; r = 0.5 has its own; both start from one dense export.
    plain = read_json(drop_upcycling / "upcycled/xs/seed0/d1_65536/e4_k2_g1/d2_32768/metrics.json")
    dropped = read_json(drop_upcycling / "upcycled/xs/seed0/d1_65536/e4_k2_g1_r0.5/d2_32768/metrics.json")
    assert "reinit_ratio" not in plain["coords"] and dropped["coords"]["reinit_ratio"] == 0.5
    dense_loss = read_json(drop_upcycling / "dense/xs/seed0/d1_65536/metrics.json")["final_val_loss"]
    assert plain["curve"]["val_loss"][0] == pytest.approx(dense_loss, abs=1e-4)  # function-preserving
    assert dropped["curve"]["val_loss"][0] > plain["curve"]["val_loss"][0]  # half the FFN re-drawn
    # Re-initialised experts stay less alike than copies of one FFN.
    assert np.mean(dropped["expert_similarity"]) < np.mean(plain["expert_similarity"])


def test_the_report_compares_the_ratios(drop_upcycling):
    summary = (drop_upcycling / "report" / "summary.md").read_text()
    section = summary[summary.index("Drop-Upcycling: re-initialisation ratio") :]
    assert "0.5" in section and "alpha3" in section
    findings = json.loads((drop_upcycling / "report" / "findings.json").read_text())
    assert any(finding["topic"] == "reinit_ratio" for finding in findings)
    assert (drop_upcycling / "report" / "reinit_ratio.png").stat().st_size > 0
