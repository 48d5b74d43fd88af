"""A training job meets a full disk while it saves a checkpoint (issue 22, item 6): one `error:`
line naming the disk and the space the checkpoint needs, exit 2, the partial save removed and the
previous checkpoint whole, so a rerun resumes from it."""

from __future__ import annotations

import pytest

import faults
from tiny_sweep import run_cli
from upcycling.train import checkpoint

STEP_TOKENS = 32 * 8  # the tiny config's seq_len x micro_batch_size
STABLE = 6144


@pytest.mark.slow  # two trainer runs
def test_full_disk_during_a_checkpoint_save_is_one_line_and_keeps_the_last_checkpoint(tiny_workdir):
    # Checkpoints every 2048 tokens (8 steps): the one at step 8 is saved, the one at step 16 meets the full disk.
    args = ["train", "--config", str(tiny_workdir / "config.yaml"), "--family", "dense", "--size", "xs"]
    result = run_cli([*args, "--stable", str(STABLE)], tiny_workdir, check=False, **faults.env(disk_full_at_step=12))
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    partial = tiny_workdir / "results/checkpoints/dense/xs/seed0" / f"stable_{STABLE}.partial"
    assert len(errors) == 1, result.stderr
    assert "checkpoints/dense/xs/seed0/stable_6144.partial is out of space" in errors[0]
    assert "a write fell short" in errors[0] and "free; the checkpoint needs about" in errors[0]
    assert "rerun" in errors[0]
    # Nothing partial: only the checkpoint saved before the fault is there, and it verifies.
    # (`latest` is DeepSpeed's own pointer, written by the first save and never trusted.)
    assert sorted(path.name for path in partial.iterdir()) == ["latest", "manifest.json", f"tokens{8 * STEP_TOKENS}"]
    assert checkpoint.problem(partial) is None
    resumed = run_cli([*args, "--stable", str(STABLE)], tiny_workdir)
    assert f"resumed its own checkpoint at {8 * STEP_TOKENS} tokens" in resumed.stdout
