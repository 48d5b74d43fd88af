"""The README's main command on the smallest sweep: `snakemake --profile profiles/local` runs the
whole DAG on this CPU, the store holds every run's loss, Snakemake's HTML report builds, and reruns
mean what they say: nothing to do when nothing changed; a training setting reruns the training
jobs and what follows them, a fit setting only the fit and the report; a dry run writes nothing; a
forced rerun retrains; a corrupt checkpoint is a clear error and the rerun heals."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import yaml

from tiny_sweep import read_json, snakemake, write_config
from upcycling.analysis.store import COORD_DEFAULTS


def job_stats(output: str) -> dict[str, int]:
    """Snakemake's 'Job stats' table as {rule: count} (empty when there is nothing to do)."""
    match = re.search(r"Job stats:\n.*?\n-+\s+-+\n(.*?)\ntotal", output, re.S)
    return {name: int(count) for name, count in re.findall(r"^(\S+)\s+(\d+)$", match.group(1), re.M)} if match else {}


def snapshot(root: Path) -> dict[str, int]:
    return {str(path): path.stat().st_mtime_ns for path in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("pipeline")
    config = write_config(workdir, {"results_dir": "results"})  # relative: the workdir can be copied
    result = snakemake(workdir, config)
    assert result.returncode == 0, result.stderr[-6000:]
    return workdir, config


def copy_of(pipeline, tmp_path) -> tuple[Path, Path]:
    """A copy of the finished pipeline (results and Snakemake's records) to change things in."""
    workdir, _ = pipeline
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy, symlinks=True)
    return copy, copy / "config.yaml"


def test_every_run_lands_in_the_store(pipeline):
    workdir, _ = pipeline
    results = workdir / "results"
    metrics = [json.loads(path.read_text()) for path in sorted(results.glob("**/metrics.json"))]
    families = {m["coords"]["init"] for m in metrics}
    assert families == {"dense", "upcycled", "scratch"}
    store = xr.open_zarr(results / "losses.zarr")
    for run in metrics:
        # A coordinate that a run's metrics leave out (reinit_ratio of plain upcycling) has its default.
        coords = {**COORD_DEFAULTS, **run["coords"]}
        coords = {key: value for key, value in coords.items() if key in store["final_val_loss"].dims}
        stored = float(store["final_val_loss"].sel(coords).values)
        assert np.isclose(stored, run["final_val_loss"], rtol=0, atol=1e-6), run["run_id"]
    # Every cell that was not run is NaN: as many finite values as runs.
    assert int(np.isfinite(store["final_val_loss"].values).sum()) == len(metrics)
    for name in ("summary.md", "guidance.json", "loss_vs_d2.png", "break_even.png"):
        assert (results / "report" / name).stat().st_size > 0, name
    assert any((results / "fits").glob("*.json"))
    # No DeepSpeed checkpoint is left behind: final jobs delete theirs, and Snakemake deleted every
    # stable checkpoint once the jobs that read it were done.
    assert not [path for path in (results / "checkpoints").rglob("*") if path.is_file()]
    # The store records the settings it was made with, without the fit's or the scheduler's.
    recorded = yaml.safe_load(store.attrs["config"])
    assert "fit" not in recorded and "slurm" not in recorded and recorded["training"]["lr"] == 3.0e-3


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


def _changed_config(workdir: Path, config: Path, section: str, **values) -> Path:
    cfg = yaml.safe_load(config.read_text())
    cfg[section].update(values)
    changed = workdir / f"changed-{section}.yaml"
    changed.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return changed


def test_a_training_setting_reruns_the_training_and_a_dry_run_writes_nothing(pipeline):
    workdir, config = pipeline
    before = snapshot(workdir / "results")
    result = snakemake(workdir, _changed_config(workdir, config, "training", lr=1.0e-3), "-n")
    assert result.returncode == 0, result.stderr[-4000:]
    stats = job_stats(result.stdout)
    inventory_counts = job_stats(snakemake(workdir, config, "-n", "--forceall").stdout)
    tokens_rules = ("train_tokenizer", "tokenize_shard", "tokenize")
    expected = {rule: count for rule, count in inventory_counts.items() if rule not in tokens_rules}
    assert stats == expected, result.stdout[-3000:]
    assert "Params have changed since last execution" in result.stdout
    assert snapshot(workdir / "results") == before  # nothing written, nothing touched


def test_a_fit_setting_reruns_only_the_fit_and_the_report(pipeline):
    workdir, config = pipeline
    result = snakemake(workdir, _changed_config(workdir, config, "fit", bootstrap=5), "-n")
    assert result.returncode == 0, result.stderr[-4000:]
    assert job_stats(result.stdout) == {"fit": 1, "report": 1, "all": 1}
    # How often a job logs is no reason to retrain it.
    result = snakemake(workdir, _changed_config(workdir, config, "training", log_every_steps=3), "-n")
    assert "Nothing to be done" in result.stdout + result.stderr


def test_a_forced_rerun_retrains(pipeline, tmp_path):
    """`--forcerun upcycled_stable` on one upcycled run retrains its chain's stable jobs and the run
    from the upcycled init: no job resumes a checkpoint of its own, and the run comes out the same,
    bitwise; the runs outside the target's DAG are not touched."""
    workdir, config = copy_of(pipeline, tmp_path)
    metrics = sorted((workdir / "results" / "upcycled").rglob("metrics.json"))
    before = {path: read_json(path) for path in metrics}
    written = {path: path.stat().st_mtime_ns for path in metrics}
    # The longest run of the larger D1: both of its chain's stable points lie before it.
    run = "results/upcycled/xs/seed0/d1_16384/e4_k2_g1/d2_16384/metrics.json"  # as the rules name it
    target = workdir / run
    result = snakemake(workdir, config, "--forcerun", "upcycled_stable", "--", run)
    assert result.returncode == 0, result.stderr[-4000:]
    assert job_stats(result.stdout + result.stderr) == {"upcycled_stable": 2, "upcycled_final": 1}
    for log in (workdir / "results" / "logs" / "upcycled" / "xs/seed0/d1_16384").rglob("stable_*.log"):
        last_attempt = log.read_text().rsplit("==== ", 2)[-2:]
        assert "resumed its own checkpoint" not in "".join(last_attempt), log
    for path, old in before.items():
        new = read_json(path)
        assert new["curve"] == old["curve"] and new["final_val_loss"] == old["final_val_loss"], path
    assert [path for path in metrics if path.stat().st_mtime_ns != written[path]] == [target]


def test_a_corrupt_checkpoint_is_named_and_the_rerun_heals(tiny_workdir):
    """A truncated stable checkpoint stops the job that reads it with one clear line naming the
    checkpoint, the job that writes it and what to do; the rerun redoes that job and heals."""
    config = tiny_workdir / "config.yaml"
    stable = tiny_workdir / "results/checkpoints/dense/xs/seed0/stable_6144"
    metrics = tiny_workdir / "results/dense/xs/seed0/d1_8192/metrics.json"
    result = snakemake(tiny_workdir, config, "--notemp", str(stable))
    assert result.returncode == 0, result.stderr[-4000:]
    weights = next(stable.rglob("mp_rank_00_model_states.pt"))
    with open(weights, "r+b") as handle:
        handle.truncate(weights.stat().st_size // 2)
    # Snakemake deletes a job's log before each attempt; the attempts log keeps every attempt.
    log = tiny_workdir / "results/logs/dense/xs/seed0/d1_8192.attempts.log"
    result = snakemake(tiny_workdir, config, str(metrics))
    assert result.returncode != 0 and not metrics.exists()
    text = log.read_text()
    error = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "Traceback" not in text, text[-3000:]
    assert text.count("==== dense/xs/seed0/d1_8192: attempt") == 1
    assert str(stable) in error[0] or "stable_6144" in error[0]
    assert "dense_stable[size=xs,seed=0,point=6144]" in error[0] and "rerun" in error[0]
    assert not stable.exists()  # the stale output is gone, so Snakemake redoes the job that wrote it
    result = snakemake(tiny_workdir, config, str(metrics))
    assert result.returncode == 0, result.stderr[-4000:]
    assert (
        job_stats(result.stdout + result.stderr).get("dense_stable") == 1 and read_json(metrics)["tokens_seen"] == 8192
    )
