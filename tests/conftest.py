"""Shared fixtures: a tiny real sweep (config + tokens) in a temporary directory, and a runner for
the `upcycling` CLI in a subprocess (each training job is its own process, as under Snakemake)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "tests" / "configs" / "tiny.yaml"


CUDA = torch.cuda.is_available()


def cli_env(**extra: str) -> dict:
    env = dict(os.environ)
    if not CUDA:
        env.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's CPU accelerator where there is no GPU
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    # The tests' own modules (faults.py: hooks the trainer installs) are importable in subprocesses.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "tests"), env.get("PYTHONPATH")]))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(extra)
    return env


def run_cli(args: list[str], cwd: Path, check: bool = True, timeout: int = 300, **env: str):
    result = subprocess.run(
        [sys.executable, "-m", "upcycling.cli", *args],
        cwd=cwd,
        env=cli_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"upcycling {' '.join(args)} exited {result.returncode}:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    return result


def write_config(workdir: Path, overrides: dict | None = None, base: Path = TINY_CONFIG) -> Path:
    """The tiny config with absolute corpus paths, results under workdir, and overrides merged in."""
    cfg = yaml.safe_load(base.read_text())
    cfg["corpus"]["paths"] = [str(REPO / p) for p in cfg["corpus"]["paths"]]
    cfg["results_dir"] = str(workdir / "results")
    for section, values in (overrides or {}).items():
        if isinstance(values, dict) and isinstance(cfg.get(section), dict):
            cfg[section].update(values)
        else:
            cfg[section] = values
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def tiny_tokens(tmp_path_factory) -> Path:
    """Tokens of the tiny corpus, made once per session."""
    workdir = tmp_path_factory.mktemp("tokens")
    config = write_config(workdir)
    run_cli(["tokenize", "--config", str(config)], cwd=workdir)
    return workdir / "results" / "tokens"


@pytest.fixture
def tiny_workdir(tmp_path, tiny_tokens) -> Path:
    """A fresh workdir with config.yaml and the session's tokens linked in."""
    write_config(tmp_path)
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "tokens").symlink_to(tiny_tokens)
    return tmp_path


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
