"""Ctrl-C (SIGINT) to a training job takes the path of SIGTERM/SIGUSR1: the job saves its checkpoint
at the end of the step, exits 75 without a traceback, and the rerun resumes from that checkpoint.
A signal once the steps are done (Slurm's warning comes up to a minute early) finishes the job."""

from __future__ import annotations

import json

import pytest

import faults
from tiny_sweep import run_cli
from upcycling.train.loop import EXIT_PREEMPTED

STEP_TOKENS, STABLE = 32 * 8, 6144


@pytest.mark.slow  # two trainer runs
def test_ctrl_c_saves_the_checkpoint_and_the_rerun_resumes_from_it(tiny_workdir):
    args = ["train", "--config", str(tiny_workdir / "config.yaml"), "--family", "dense", "--size", "xs"]
    stop_step = 5
    env = {**faults.env(signal_at_step=stop_step), faults.SIGNAL_NAME: "SIGINT"}
    stopped = run_cli([*args, "--stable", str(STABLE)], cwd=tiny_workdir, check=False, **env)
    assert stopped.returncode == EXIT_PREEMPTED, stopped.stdout[-2000:] + stopped.stderr[-2000:]
    assert "SIGINT received: checkpoint saved" in stopped.stdout
    assert "Traceback" not in stopped.stderr and "KeyboardInterrupt" not in stopped.stderr
    partial = tiny_workdir / "results/checkpoints/dense/xs/seed0" / f"stable_{STABLE}.partial"
    assert partial.is_dir()

    resumed = run_cli([*args, "--stable", str(STABLE)], cwd=tiny_workdir)
    assert f"resumed its own checkpoint at {stop_step * STEP_TOKENS} tokens" in resumed.stdout
    assert (tiny_workdir / "results/checkpoints/dense/xs/seed0" / f"stable_{STABLE}").is_dir()


@pytest.mark.slow  # a trainer run
def test_a_warning_at_the_last_step_or_at_exit_leaves_the_run_finished(tmp_path, make_workdir):
    """SIGUSR1 at the run's last step, then again and again from when its metrics are written until
    the process is gone: the run finishes (exit 0, its metrics and export, no checkpoint left behind)
    instead of saving a checkpoint at its end, or dying of the signal as Python exits (Snakemake
    then deletes the finished run's outputs, and the checkpoint is already gone)."""
    workdir = make_workdir(tmp_path, {"training": {"schedule": "cosine"}})  # one job: no stable checkpoint
    budget = 8192
    run_dir = workdir / "results/dense/xs/seed0" / f"d1_{budget}"
    env = faults.env(signal_at_step=budget // STEP_TOKENS)
    env["UPCYCLING_HOOKS"] += ",faults:signals_after_file"
    env[faults.SIGNALS_AFTER_FILE] = str(run_dir / "metrics.json")
    args = ["train", "--config", str(workdir / "config.yaml"), "--family", "dense", "--size", "xs"]
    result = run_cli([*args, "--budget", str(budget)], cwd=workdir, check=False, **env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "checkpoint saved" not in result.stdout and f"done, {budget} tokens" in result.stdout
    assert json.loads((run_dir / "metrics.json").read_text())["tokens_seen"] == budget
    assert (run_dir / "hf" / "model.safetensors").is_file()
    assert not list((workdir / "results/checkpoints").rglob("*.partial"))
