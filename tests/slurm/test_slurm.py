"""Slurm support against a real single-node Slurm cluster on this machine (marker ``slurm``; the session fixture
starts it with scripts/slurm/start-local-cluster.sh and skips, saying why, when it cannot):

- submitit submits a function and a training job; the training job is interrupted the way a
  time-out is announced, checkpoints, requeues and resumes;
- srun starts a two-process training job whose ranks come from Slurm's variables;
- ``snakemake --profile profiles/slurm``: test_slurm_profile.py.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tiny_sweep import REPO, cli_env, read_json, write_config
from unit.test_cluster import PAPER, _sweep
from upcycling.cluster import launch
from upcycling.cluster.plan import plan
from upcycling.cluster.resources import launcher
from upcycling.sweep.load import load_sweep

# ----------------------------------------------------------------------------- the local cluster


def slurm_env(**extra: str) -> dict:
    """What the submitting process exports to its jobs (sbatch --export=ALL): the venv first on
    PATH, DeepSpeed on CPU, the shared JIT cache."""
    env = cli_env(**extra)
    # As scripts/env.sh: the sbatch that waits out an unreachable controller, then the venv.
    shim = REPO / "scripts" / "slurm" / "bin"
    env["PATH"] = os.pathsep.join([str(shim), str(Path(sys.executable).parent), env.get("PATH", "")])
    for key in [key for key in env if key.startswith(("SLURM_", "SBATCH_", "SRUN_", "SNAKEMAKE_"))]:
        env.pop(key)
    return env


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def sacct_state(job_id: str) -> str:
    out = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-j", str(job_id), "-o", "State"], capture_output=True, text=True
    ).stdout.split()
    return out[0] if out else ""


def _remote_plan_totals(config_path: str) -> dict:
    """Runs on a Slurm node: imports upcycling and plans the sweep there."""
    import socket

    from upcycling.cluster.plan import plan
    from upcycling.sweep.load import load_sweep

    totals = plan(load_sweep(config_path, check_corpus=False))["totals"]
    return {
        "host": socket.gethostname(),
        "job_id": os.environ.get("SLURM_JOB_ID"),
        "training_jobs": totals["training_jobs"],
        "expected_gpu_hours": totals["expected_gpu_hours"],
    }


@pytest.mark.slurm
def test_submitit_runs_a_function_on_slurm(slurm_cluster, tmp_path, monkeypatch):
    import cloudpickle
    import submitit

    # This test module is not importable on the node: send the function by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    for key, value in slurm_env().items():
        monkeypatch.setenv(key, value)
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    executor.update_parameters(timeout_min=5, cpus_per_task=1, mem_gb=1, name="upcycling-plan")
    job = executor.submit(_remote_plan_totals, str(PAPER))
    result = job.result()
    local = plan(_sweep())["totals"]
    assert result["job_id"] == job.job_id
    assert result["training_jobs"] == local["training_jobs"]
    assert result["expected_gpu_hours"] == pytest.approx(local["expected_gpu_hours"])
    wait_for(lambda: sacct_state(job.job_id) == "COMPLETED", 60, "sacct to report the job COMPLETED")


@pytest.mark.slurm
def test_submitit_training_requeues_and_resumes(slurm_cluster, tiny_workdir, tmp_path):
    """A training run submitted with submit_training gets the time-out warning while it trains: it
    checkpoints, requeues itself, and the requeued job resumes from the checkpoint and finishes."""
    config = write_config(
        tiny_workdir,
        {
            "training": {
                "schedule": "cosine",
                "checkpoint_every_tokens": 32768,
                "eval_every_tokens": 32768,
                "log_every_steps": 4,
            },
            "sweep": {"d1_tokens": [8192, 131072]},
            "slurm": {"gpus_per_job": 0, "signal_seconds_before_limit": 60},
        },
    )
    train_args = ["--family", "dense", "--size", "xs", "--budget", "131072"]
    job = launch.submit_training(
        config, train_args, tmp_path / "submitit", workdir=tiny_workdir, env=slurm_env(), cpus_per_task=1, mem_gb=3
    )
    # Wait until the trainer is past its first step, then announce the time limit (USR2).
    # A busy node may start the job late (DeepSpeed also JIT-builds its comm op once): wait for the event.
    try:
        wait_for(lambda: " step " in _read(job.paths.stdout) or job.done(), 420, "the trainer's first steps", 0.2)
        assert " step " in _read(job.paths.stdout), f"the job ended before its first step ({job.state})"
    except AssertionError as exc:
        queue = subprocess.run(["squeue", "-o", "%i %T %r %M"], capture_output=True, text=True).stdout
        raise AssertionError(
            f"{exc}\nsqueue:\n{queue}\nstdout:\n{_read(job.paths.stdout)[-2000:]}\nstderr:\n{_read(job.paths.stderr)[-2000:]}"
        ) from None
    job._interrupt(timeout=True)
    result = job.result()
    log = _read(job.paths.stdout) + _read(job.paths.stderr)
    assert result["returncode"] == 0 and result["restarts"] >= 1, log[-3000:]
    assert "resumed its own checkpoint" in log, log[-3000:]
    metrics = read_json(tiny_workdir / "results" / "dense" / "xs" / "seed0" / "d1_131072" / "metrics.json")
    assert metrics["tokens_seen"] == 131072 and math.isfinite(metrics["final_val_loss"])
    assert result["final_val_loss"] == metrics["final_val_loss"]


def _read(path) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


@pytest.mark.slurm
def test_srun_starts_one_rank_per_task(slurm_cluster, tiny_workdir):
    """`srun` with two tasks: each process maps Slurm's variables to RANK/WORLD_SIZE/... and the two
    train one model together (gloo on CPU)."""
    config = write_config(
        tiny_workdir, {"training": {"schedule": "cosine"}, "slurm": {"gpus_per_job": 2, "cpus_per_gpu": 1}}
    )
    srun = launcher(load_sweep(config, base_dir=tiny_workdir)).split()  # what the training rules put first
    assert srun[:3] == ["srun", "--nodes=1", "--ntasks-per-node=2"]
    command = [
        *srun,
        "--mem=3000",
        "--time=10",
        sys.executable,
        "-m",
        "upcycling.cli",
        "train",
        "--config",
        str(config),
        "--family",
        "dense",
        "--size",
        "xs",
        "--budget",
        "8192",
    ]
    result = subprocess.run(command, cwd=tiny_workdir, env=slurm_env(), capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "[rank 0]" in output and "[rank 1]" in output
    metrics = read_json(tiny_workdir / "results" / "dense" / "xs" / "seed0" / "d1_8192" / "metrics.json")
    assert metrics["tokens_seen"] == 8192 and math.isfinite(metrics["final_val_loss"])
