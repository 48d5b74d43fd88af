"""Ctrl-C (SIGINT) to a training job takes the path of SIGTERM/SIGUSR1: the job saves its checkpoint
at the end of the step, exits 75 without a traceback, and the rerun resumes from that checkpoint."""

from __future__ import annotations

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
