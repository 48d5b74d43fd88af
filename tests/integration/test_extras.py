"""Each stage runs with only its own install extra (pyproject.toml): the commands of a stage import
and run while every package that only another extra brings is absent.

A package is made absent by a module of its name, first on PYTHONPATH, that raises
ModuleNotFoundError as a missing package does (a fake for failure injection: the stage's own
libraries are the real ones)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import REPO, read_json, run_cli, write_config

# What each extra brings, beyond the base install (snakemake, numpy, pyyaml, jsonschema, ...).
TOKENS_ONLY = ("tokenizers", "pyarrow")
TRAIN_ONLY = ("torch", "deepspeed", "safetensors")
ANALYSIS_ONLY = ("xarray", "pandas", "zarr", "numcodecs", "lmfit", "scipy", "matplotlib")
TEST_ONLY = ("transformers", "datasets")


def _without(tmp_path: Path, packages: tuple[str, ...]) -> dict[str, str]:
    """The environment of a subprocess in which ``packages`` cannot be imported."""
    shadow = tmp_path / f"without_{len(packages)}_packages"
    shadow.mkdir(exist_ok=True)
    for name in packages:
        (shadow / f"{name}.py").write_text(f"raise ModuleNotFoundError(\"No module named '{name}'\", name='{name}')\n")
    # The tests' directory stays importable: the trainer's fault hooks live there.
    return {"PYTHONPATH": f"{shadow}:{REPO / 'tests'}"}


# Cosine: every run is one job from its start, so a final job runs without a stable chain.
COSINE = {"training": {"schedule": "cosine"}}


def test_the_tokens_stage_runs_with_only_the_tokens_extra(tmp_path):
    config = write_config(tmp_path, COSINE)
    blocked = _without(tmp_path, TRAIN_ONLY + ANALYSIS_ONLY + TEST_ONLY)
    run_cli(["tokenize", "--config", str(config)], cwd=tmp_path, **blocked)
    meta = read_json(tmp_path / "results" / "tokens" / "meta.json")
    assert meta["train_tokens"] > 0 and meta["val_tokens"] > 0


@pytest.mark.slow
def test_training_and_transform_run_with_only_the_train_extra(tmp_path, make_workdir):
    """A dense job, its upcycling into an MoE, and the MoE's training: no tokenizers, pyarrow or
    analysis libraries (the trainer reads the token files with numpy)."""
    config = make_workdir(tmp_path, COSINE) / "config.yaml"
    blocked = _without(tmp_path, TOKENS_ONLY + ANALYSIS_ONLY + TEST_ONLY)
    dense = ["--family", "dense", "--size", "xs", "--budget", "8192"]
    run_cli(["train", "--config", str(config), *dense], cwd=tmp_path, **blocked)
    run = tmp_path / "results" / "dense" / "xs" / "seed0" / "d1_8192"
    assert read_json(run / "metrics.json")["tokens_seen"] >= 8192
    variant = ["--size", "xs", "--d1", "8192", "--variant", "e4_k2_g1"]
    run_cli(["transform", "--config", str(config), *variant], cwd=tmp_path, **blocked)
    upcycled = tmp_path / "results" / "upcycled" / "xs" / "seed0" / "d1_8192" / "e4_k2_g1"
    assert json.loads((upcycled / "init" / "config.json").read_text())["num_local_experts"] == 4
    moe = ["--family", "upcycled", "--size", "xs", "--d1", "8192", "--experts", "4", "--top-k", "2", "--budget", "8192"]
    run_cli(["train", "--config", str(config), *moe], cwd=tmp_path, **blocked)
    assert read_json(upcycled / "d2_8192" / "metrics.json")["tokens_seen"] >= 8192


@pytest.mark.slow  # a fit and a report in a subprocess
def test_fit_and_report_run_with_only_the_analysis_extra(tmp_path):
    """The fits and the report on a store of known laws: no torch, DeepSpeed or tokenizers."""
    import synthetic_study as study

    store = tmp_path / "losses.zarr"
    study.store(store, sparsity=False, sizes=("xs", "s"))
    config = tmp_path / "config.yaml"
    config.write_text((REPO / "config" / "config.yaml").read_text().replace("bootstrap: 64", "bootstrap: 2"))
    blocked = _without(tmp_path, TOKENS_ONLY + TRAIN_ONLY + TEST_ONLY)
    fits = tmp_path / "fits"
    fit = ["fit", "--config", str(config), "--workdir", str(REPO), "--store", str(store), "--out-dir", str(fits)]
    run_cli(fit, cwd=tmp_path, **blocked)
    assert any(fits.glob("dataset.*.json"))
    report = tmp_path / "report"
    run_cli(["report", "--store", str(store), "--fits", str(fits), "--out-dir", str(report)], cwd=tmp_path, **blocked)
    assert (report / "summary.md").read_text().startswith("# Upcycling scaling-law report")
    assert (report / "break_even.png").stat().st_size > 0
