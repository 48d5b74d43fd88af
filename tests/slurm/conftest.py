"""The local Slurm cluster the Slurm lane runs against, started once per session."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

from tiny_sweep import REPO

START = REPO / "scripts" / "slurm" / "start-local-cluster.sh"


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running local Slurm cluster (started here when needed), or a skip that says why."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip(
            "the local Slurm cluster needs root (start-local-cluster.sh installs packages and starts "
            "daemons); run the tests as root to include the Slurm tests"
        )
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        pytest.skip("Slurm is not installed and there is no apt-get to install it (Debian/Ubuntu needed)")
    started = time.monotonic()
    result = subprocess.run(["bash", str(START)], capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        pytest.skip(
            f"the local Slurm cluster did not come up (start-local-cluster.sh exited {result.returncode}): "
            f"{(result.stderr or result.stdout).strip()[-800:]}"
        )
    print(f"\nlocal Slurm cluster up in {time.monotonic() - started:.0f} s")
    return {"bring_up_s": time.monotonic() - started}
