"""The README's main command on the smallest sweep: `snakemake --profile profiles/local` runs the
whole DAG on this CPU, the store holds every run's loss, Snakemake's HTML report builds, and a
second run finds nothing to do."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from conftest import REPO, cli_env, write_config

pytestmark = pytest.mark.slow


def snakemake(workdir: Path, config: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory",
               str(workdir), "--profile", str(REPO / "profiles" / "local"), "--cores", "2",
               "--configfile", str(config), *args]
    return subprocess.run(command, cwd=workdir, env=cli_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("pipeline")
    config = write_config(workdir)
    result = snakemake(workdir, config)
    assert result.returncode == 0, result.stderr[-6000:]
    return workdir, config


def test_every_run_lands_in_the_store(pipeline):
    workdir, _ = pipeline
    results = workdir / "results"
    metrics = [json.loads(path.read_text()) for path in sorted(results.glob("**/metrics.json"))]
    families = {m["coords"]["init"] for m in metrics}
    assert families == {"dense", "upcycled", "scratch"}
    store = xr.open_zarr(results / "losses.zarr")
    for run in metrics:
        coords = {key: value for key, value in run["coords"].items() if key in store["final_val_loss"].dims}
        stored = float(store["final_val_loss"].sel(coords).values)
        assert np.isclose(stored, run["final_val_loss"], rtol=0, atol=1e-6), run["run_id"]
    # Every cell that was not run is NaN: as many finite values as runs.
    assert int(np.isfinite(store["final_val_loss"].values).sum()) == len(metrics)
    for name in ("summary.md", "guidance.json", "loss_vs_d2.png", "break_even.png"):
        assert (results / "report" / name).stat().st_size > 0, name
    assert any((results / "fits").glob("*.json"))


def test_snakemake_report_builds(pipeline):
    workdir, config = pipeline
    report = workdir / "report.html"
    result = snakemake(workdir, config, "--report", str(report))
    assert result.returncode == 0, result.stderr[-4000:]
    assert report.stat().st_size > 10_000 and "loss_vs_d2" in report.read_text(errors="replace")


def test_a_second_run_has_nothing_to_do(pipeline):
    workdir, config = pipeline
    result = snakemake(workdir, config, "-n")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Nothing to be done" in result.stdout + result.stderr
