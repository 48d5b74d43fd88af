"""The DAG Snakemake builds from a config (dry runs, nothing trained): the jobs per rule match
`upcycling plan`, a bad config is refused at DAG build, --configfile and --config reach every job's
spec, and building the DAG imports none of the stages' libraries."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys

import pytest
import yaml

from tiny_sweep import REPO, cli_env
from unit.test_config import DEFAULT
from unit.test_jobs import _inventory
from upcycling.cli import EXTRA_OF_MODULE
from upcycling.cluster.plan import plan
from upcycling.pipeline.jobs import RULES


def _snakemake(workdir, *args):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "--snakefile",
            str(REPO / "Snakefile"),
            "--cores",
            "2",
            "--directory",
            str(workdir),
            *args,
        ],
        cwd=workdir,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


# The shipped configs the workflow lane runs only in part (tests/workflow/test_stage2_methods.py runs
# bootstrapped.yaml with drop_upcycling.yaml's ratios): as shipped, each builds its whole DAG.
SHIPPED_JOBS = {"bootstrapped": 76, "drop_upcycling": 38}


@pytest.mark.parametrize("name", sorted(SHIPPED_JOBS))
def test_snakemake_builds_the_dag_of_each_shipped_config(tmp_path, name):
    result = _snakemake(
        tmp_path,
        "-n",
        "--forceall",
        "--configfile",
        str(REPO / "config" / f"{name}.yaml"),
        "--config",
        f"results_dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    total = re.search(r"^total\s+(\d+)$", result.stdout, re.M)
    assert total and int(total.group(1)) == SHIPPED_JOBS[name], result.stdout[-3000:]


def test_snakemake_builds_the_dag_on_the_default_config(tmp_path):
    result = _snakemake(
        tmp_path,
        "-n",
        "--forceall",
        "--quiet",
        "rules",
        "--configfile",
        str(REPO / "config" / "config.yaml"),
        "--config",
        f"results_dir={tmp_path / 'results'}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    counts = dict(
        line.split()[:2]
        for line in result.stdout.splitlines()
        if line.strip() and line.split()[-1].isdigit() and len(line.split()) == 2
    )
    cfg = DEFAULT
    sizes, d1, d2 = len(cfg["dense_models"]), len(cfg["sweep"]["d1_tokens"]), len(cfg["sweep"]["d2_tokens"])
    extra = len(cfg["sweep"]["model_config"]["experts"])  # model-configuration runs: one D2 each
    assert int(counts["dense_final"]) == sizes * d1
    assert int(counts["transform"]) == sizes * (d1 + extra)
    assert int(counts["upcycled_final"]) == sizes * (d1 * d2 + extra)
    assert int(counts["upcycled_stable"]) == sizes * (d1 * d2 + extra)  # one stable point per D2
    assert int(counts["scratch_final"]) == sizes * len(cfg["baselines"]["scratch_d_tokens"])
    assert (tmp_path / ".snakemake").is_dir()


def test_snakemake_refuses_a_bad_config_at_dag_build(tmp_path):
    cfg = copy.deepcopy(DEFAULT)
    cfg["sweep"]["top_k"] = [8]
    cfg["corpus"]["paths"] = [str(REPO / p) for p in cfg["corpus"]["paths"]]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    result = _snakemake(tmp_path, "-n", "--configfile", str(tmp_path / "bad.yaml"))
    assert result.returncode != 0
    assert "sweep.top_k" in result.stderr + result.stdout
    assert not (tmp_path / "results").exists()


def test_jobs_run_the_sweep_the_dag_was_built_from(tmp_path):
    """--configfile replaces the default sweep (nothing of it leaks in), --config KEY=VALUE
    overrides reach every job: each job's command carries its spec, and no file is written."""
    results = tmp_path / "results"
    result = _snakemake(
        tmp_path,
        "-n",
        "--forceall",
        "-p",
        "--configfile",
        str(REPO / "tests" / "configs" / "tiny.yaml"),
        "--config",
        f"results_dir={results}",
        "training={'lr': 0.002}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    tiny = yaml.safe_load((REPO / "tests" / "configs" / "tiny.yaml").read_text())
    specs = [json.loads(spec) for spec in re.findall(r"upcycling train --spec '(\{.*?\})'", result.stdout)]
    assert specs and {spec["run_id"].split("/")[1] for spec in specs} == set(tiny["dense_models"])
    assert {spec["end_tokens"] for spec in specs if spec["family"] == "dense" and spec["phase"] == "final"} == set(
        tiny["sweep"]["d1_tokens"]
    )
    assert {spec["training"]["lr"] for spec in specs} == {0.002}  # the override, in every job
    assert all(spec["training"]["micro_batch_size"] == tiny["training"]["micro_batch_size"] for spec in specs)
    assert not results.exists()  # a dry run writes nothing


def _dry_run_counts(tmp_path) -> tuple[dict[str, int], set[str]]:
    """Jobs per rule of `snakemake -n` on the default config, and the modules it imported."""
    result = subprocess.run(
        [
            sys.executable,
            "-X",
            "importtime",
            "-m",
            "snakemake",
            "--snakefile",
            str(REPO / "Snakefile"),
            "-n",
            "--forceall",
            "--cores",
            "2",
            "--directory",
            str(tmp_path),
            "--config",
            f"results_dir={tmp_path / 'results'}",
        ],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    table = re.search(r"Job stats:\n.*?\n-+\s+-+\n(.*?)\ntotal", result.stdout, re.S).group(1)
    return {name: int(count) for name, count in re.findall(r"^(\S+)\s+(\d+)$", table, re.M)}, _imported(result.stderr)


def _imported(importtime_log: str) -> set[str]:
    """The modules a `python -X importtime` run imported."""
    return {line.rsplit("|", 1)[1].strip() for line in importtime_log.splitlines() if line.startswith("import time:")}


def test_plan_lists_the_jobs_snakemake_runs(tmp_path):
    """`upcycling plan` and `snakemake -n` read the same inventory: the same jobs per rule. Building
    the DAG imports none of the stages' libraries (the base install builds it; cli.EXTRA_OF_MODULE)."""
    dry_run, imported = _dry_run_counts(tmp_path)
    # Snakemake itself imports pandas (and pandas pyarrow, when installed).
    stage_libraries = set(EXTRA_OF_MODULE) - {"pandas", "pyarrow"}
    assert not imported & stage_libraries, sorted(imported & stage_libraries)
    plan_run = subprocess.run(
        [
            sys.executable,
            "-X",
            "importtime",
            "-m",
            "upcycling.cli",
            "plan",
            "--config",
            str(REPO / "config" / "config.yaml"),
        ],
        cwd=tmp_path,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert plan_run.returncode == 0 and not _imported(plan_run.stderr) & stage_libraries, plan_run.stderr[-2000:]
    assert dry_run.pop("all") == 1
    planned = {rule: info["jobs"] for rule, info in plan(_inventory().sweep)["rules"].items()}
    assert planned == dry_run
    assert set(planned) == set(RULES)
