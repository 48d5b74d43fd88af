"""The tiny real sweep the tests run (tests/configs/tiny.yaml) and the `upcycling` CLI in a subprocess
(each training job is its own process, as under Snakemake). No torch here: the unit lane imports it."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "tests" / "configs" / "tiny.yaml"


@functools.cache
def cuda_available() -> bool:
    """Whether a CUDA GPU is here; torch is asked only when installed (the unit lane runs without it)."""
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


def cli_env(**extra: str) -> dict:
    env = dict(os.environ)
    if not cuda_available():
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


def snakemake(
    workdir: Path, config: Path, *args: str, cores: int = 2, timeout: int = 900
) -> subprocess.CompletedProcess:
    """`snakemake --profile profiles/local` on config in workdir, as a user runs the pipeline."""
    command = [
        sys.executable,
        "-m",
        "snakemake",
        "--snakefile",
        str(REPO / "Snakefile"),
        "--configfile",
        str(config),
        "--directory",
        str(workdir),
        "--profile",
        str(REPO / "profiles" / "local"),
        "--cores",
        str(cores),
        *args,
    ]
    return subprocess.run(command, cwd=workdir, env=cli_env(), capture_output=True, text=True, timeout=timeout)


# A shipped config end to end (with the tests' cuts) takes about 5 minutes beside another test worker
# (scripts/test.sh); twice the per-test default leaves room for a slower machine.
REPO_CONFIG_TIMEOUT_S = 1800


def run_repo_config(workdir: Path, name: str, overrides: dict | None = None) -> Path:
    """One of the repository's configs (config/<name>.yaml), with overrides merged in section by
    section, through the whole DAG in workdir, with its results in workdir/results; returns that
    directory (the run must succeed)."""
    cfg = merge_sections(yaml.safe_load((REPO / "config" / f"{name}.yaml").read_text()), overrides)
    cfg["results_dir"] = "results"
    config = workdir / f"{name}.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    result = snakemake(workdir, config, timeout=REPO_CONFIG_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-6000:]
    return workdir / "results"


def merge_sections(cfg: dict, overrides: dict | None) -> dict:
    """cfg with overrides merged in, section by section: a mapping's keys into the section's mapping,
    anything else in place of the section; returns cfg (changed in place)."""
    for section, values in (overrides or {}).items():
        if isinstance(values, dict) and isinstance(cfg.get(section), dict):
            cfg[section] = {**cfg[section], **values}
        else:
            cfg[section] = values
    return cfg


def write_config(workdir: Path, overrides: dict | None = None, base: Path = TINY_CONFIG) -> Path:
    """The tiny config with absolute corpus paths, results under workdir, and overrides merged in."""
    cfg = yaml.safe_load(base.read_text())
    cfg["corpus"]["paths"] = [str(REPO / p) for p in cfg["corpus"]["paths"]]
    cfg["results_dir"] = str(workdir / "results")
    merge_sections(cfg, overrides)
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
