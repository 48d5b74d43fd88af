"""`upcycling predict`, `upcycling fit` and `upcycling report` in subprocesses, as a user and the
Snakemake rules call them, on the synthetic study (the shared `fitted` fixture)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import synthetic_study as study
from tiny_sweep import REPO, run_cli
from upcycling.analysis import advice, fitstage

# the fitted synthetic study (about 40 s) and CLI runs: the slow lane
pytestmark = pytest.mark.slow


def test_predict_cli_plans_from_saved_fits_and_refuses_bad_arguments(fitted, tmp_path):
    root, _, fits = fitted
    n1 = str(study.counts("s").non_embedding)
    args = ["predict", "--fits", str(root / "fits"), "--d1", "131072", "--d2", "262144", "--experts", "4"]
    out = json.loads(run_cli([*args, "--n1", n1, "--top-k", "2"], cwd=tmp_path).stdout)
    expected = advice.predict(fitstage.load_fits(root / "fits"), float(n1), 131072, 262144, 4, 2)
    assert out["loss"] == pytest.approx(expected["loss"])
    assert out["recommendation"] == expected["recommendation"]
    for bad, named in (
        (["--n1", "-5", "--top-k", "2"], "--n1"),
        (["--n1", "1e6", "--top-k", "8"], "--top-k"),
        (["--n1", "1e6", "--top-k", "2", "--method", "nope"], "--method"),
    ):
        result = run_cli([*args, *bad], cwd=tmp_path, check=False)
        assert result.returncode != 0 and named in result.stderr, result.stderr
    unknown = run_cli([*args[:-1], "8", "--n1", n1, "--top-k", "2"], cwd=tmp_path, check=False)
    assert unknown.returncode != 0 and "no fitted law" in unknown.stderr


def test_fit_and_report_cli(fitted, tmp_path):
    """`upcycling fit` and `upcycling report` as the Snakemake rules call them."""
    store = tmp_path / "losses.zarr"
    study.store(store, sparsity=False, sizes=("xs", "s"))  # small: the CLI's plumbing
    config = tmp_path / "config.yaml"
    config.write_text((REPO / "config" / "config.yaml").read_text().replace("bootstrap: 64", "bootstrap: 2"))
    run_cli(
        [
            "fit",
            "--config",
            str(config),
            "--workdir",
            str(REPO),
            "--store",
            str(store),
            "--out-dir",
            str(tmp_path / "fits"),
            "--workers",
            "1",
            "--parameter-counts",
            "total",
        ],
        cwd=tmp_path,
    )
    fits = fitstage.load_fits(tmp_path / "fits")
    assert fits["dataset.moe_upcycle.s.e4k2g1"].context["parameter_counts"] == "total"
    assert math.isfinite(fits["dataset.moe_upcycle.s.e4k2g1"].params["alpha3"])
    assert "needs at least 3 distinct values of n1" in fits["joint.moe_upcycle.e4k2g1"].reason
    run_cli(
        ["report", "--store", str(store), "--fits", str(tmp_path / "fits"), "--out-dir", str(tmp_path / "report")],
        cwd=tmp_path,
    )
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert summary.splitlines()[0] == "# Upcycling scaling-law report"
    assert "**total**" in summary
    items = json.loads((tmp_path / "report" / "findings.json").read_text())
    per_fit = next(item for item in items if item["topic"] == "interaction" and not item["summary"])
    assert np.isfinite(per_fit["data"]["alpha3"]) and per_fit["token_unit"] == "billions"
    assert "model_config.moe_upcycle` was not fitted" in summary  # no sparsity axis here
