"""The lanes as README.md describes them: the unit lane collects and runs where torch and DeepSpeed
are not installed (the analysis stage needs neither; the files that do need torch skip, saying why)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tiny_sweep import REPO

# A sitecustomize that makes torch and DeepSpeed look uninstalled: every finder says it cannot find
# them, so importlib.util.find_spec returns None (as libraries that probe for torch expect) and an
# import raises ModuleNotFoundError.
HIDE_TORCH = """
import sys


class _Hiding:
    def __init__(self, finder):
        self._finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "deepspeed"):
            return None
        return self._finder.find_spec(name, path, target)

    def __getattr__(self, attr):
        return getattr(self._finder, attr)


sys.meta_path[:] = [_Hiding(finder) if hasattr(finder, "find_spec") else finder for finder in sys.meta_path]
"""


def _pytest_without_torch(tmp_path, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "sitecustomize.py").write_text(HIDE_TORCH)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # runs the unit lane in a fresh environment
def test_the_unit_lane_runs_without_torch(tmp_path):
    collected = _pytest_without_torch(tmp_path, "--collect-only", "tests/unit")
    assert collected.returncode == 0, collected.stdout[-3000:]  # no unit file imports torch unguarded
    assert "tests/unit/test_laws.py::" in collected.stdout
    assert "SKIPPED" in collected.stdout and "could not import 'torch'" in collected.stdout
    ran = _pytest_without_torch(tmp_path, "tests/unit/test_laws.py", "tests/unit/test_results.py")
    assert ran.returncode == 0 and " passed" in ran.stdout, ran.stdout[-3000:]
