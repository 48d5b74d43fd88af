"""Faults of the driver and the controller under ``snakemake --profile profiles/slurm`` (local cluster):

- the driver is killed (a dropped login session) while a training job runs: the restarted driver
  cancels the earlier run's job (its trainer saves a checkpoint) and resumes it, so no token is
  trained twice and no copy trains beside another;
- the controller is down when the driver submits: sbatch (scripts/slurm/bin/sbatch) waits for it, and
  the job's retries stay unspent.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

import faults
from slurm.test_slurm import _read, wait_for
from slurm.test_slurm_profile import _newest_run_id, _snakemake, dense_final_sweep
from tiny_sweep import read_json

# The first attempt is slowed (faults:slow_first_attempt), so it still trains when the driver restarts.
DRIVER_KILLED_TOKENS = 200_000


def _live_jobs(run_id: str) -> list[str]:
    out = subprocess.run(["squeue", "-h", f"--name={run_id}", "-o", "%i"], capture_output=True, text=True).stdout
    return out.split()


@pytest.mark.slurm
def test_a_restarted_driver_cancels_the_dead_run_s_job_and_resumes_it(slurm_cluster, make_workdir, tmp_path):
    config, inventory, job = dense_final_sweep(make_workdir, tmp_path, DRIVER_KILLED_TOKENS)
    log = Path(job.log)
    # The first attempt sleeps after each step, as on a slow node: however long the restart takes on a
    # loaded machine, that attempt still trains when the new driver looks; the attempt after it does not.
    slow = faults.slow_first_attempt_env(tmp_path / "first-attempt")
    driver = _snakemake(tmp_path, config, [job.outputs["metrics"]], "--retries", "0", wait=False, env=slow)
    run_id = wait_for(lambda: _newest_run_id(tmp_path, set()), 120, "snakemake's SLURM run ID")
    wait_for(lambda: " step " in _read(log), 420, f"{log.name} to show training steps", interval=0.2)
    driver.send_signal(signal.SIGKILL)  # a dropped login session: no chance to clean up
    driver.communicate(timeout=60)
    assert _live_jobs(run_id), "the earlier run's job should still run after its driver died"

    returncode, unlock = _snakemake(tmp_path, config, [job.outputs["metrics"]], "--unlock")
    assert returncode == 0, unlock[-2000:]
    returncode, output = _snakemake(tmp_path, config, [job.outputs["metrics"]], "--retries", "0", timeout=600)
    attempts = _read(log.with_name(log.stem + ".attempts.log"))
    assert returncode == 0, output[-4000:] + attempts[-2000:]
    assert "earlier run of this workflow" in output, output[-3000:]
    assert not _live_jobs(run_id)
    # Two attempts: the first saved at the cancel, the second resumed from there (not from token 0).
    assert attempts.count("==== dense/xs/seed0/d1_") == 2, attempts[-3000:]
    assert "SIGTERM received: checkpoint saved" in attempts and "resumed its own checkpoint" in attempts
    assert read_json(job.outputs["metrics"])["tokens_seen"] == DRIVER_KILLED_TOKENS
    assert not (inventory.sweep.results_dir / job.train_spec.partial).exists()  # the final job removed it


def _slurmctld(running: bool) -> None:
    if running:
        subprocess.run(["/usr/sbin/slurmctld"], check=True)
        wait_for(lambda: subprocess.run(["sinfo", "-h"], capture_output=True).returncode == 0, 60, "slurmctld")
    else:
        pid = int(Path("/run/slurmctld.pid").read_text())
        subprocess.run(["kill", str(pid)], check=True)
        wait_for(lambda: subprocess.run(["kill", "-0", str(pid)], capture_output=True).returncode != 0, 30, "exit")


@pytest.mark.slurm
def test_a_controller_outage_at_submission_spends_no_retry(slurm_cluster, make_workdir, tmp_path):
    config, _, job = dense_final_sweep(make_workdir, tmp_path, 8192)
    _slurmctld(running=False)
    try:
        driver = _snakemake(tmp_path, config, [job.outputs["metrics"]], "--retries", "0", wait=False)
        time.sleep(45)  # the driver starts and tries to submit while the controller is down
        assert driver.poll() is None, "snakemake gave up while the controller was down"
    finally:
        _slurmctld(running=True)
    output, _ = driver.communicate(timeout=420)
    assert driver.returncode == 0, output[-4000:]
    assert read_json(job.outputs["metrics"])["tokens_seen"] == 8192
