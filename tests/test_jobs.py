"""The job inventory: one list of jobs for the Snakefile, `upcycling plan` and the resources, with a
spec per job that holds exactly what its result depends on."""

from __future__ import annotations

import copy
import re
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, cli_env
from upcycling.cli import EXTRA_OF_MODULE
from upcycling.cluster.plan import plan
from upcycling.pipeline.jobs import RULES, Inventory, UnknownJob
from upcycling.sweep.load import sweep_from_mapping

DEFAULT = yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def _inventory(mutate=None) -> Inventory:
    mapping = copy.deepcopy(DEFAULT)
    if mutate:
        mutate(mapping)
    return Inventory(sweep_from_mapping(mapping, REPO))


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


def test_every_input_is_made_by_an_earlier_job():
    inventory = _inventory()
    made: set[str] = set()
    for job in inventory.jobs:
        missing = set(job.inputs.values()) - made
        assert not missing, (job.label, missing)
        made.update(job.outputs.values())
    assert len({job.label for job in inventory.jobs}) == len(inventory.jobs)


def _changed(mutate) -> set[str]:
    """Rules whose jobs' specs (their Snakemake params) change with a config change."""
    before = {job.label: job.fingerprint for job in _inventory().jobs}
    return {job.rule for job in _inventory(mutate).jobs if before[job.label] != job.fingerprint}


def test_a_setting_changes_exactly_the_specs_that_depend_on_it():
    training = {rule for rule in RULES if rule.endswith(("_stable", "_final"))}
    # A training setting: every training job (the upcycling of a retrained dense model follows
    # through its input's fingerprint), nothing of the tokens or the fits.
    assert _changed(lambda cfg: cfg["training"].update(lr=1e-3)) == training | {"transform", "aggregate"}
    # MoE settings: the MoE jobs only (the dense runs do not depend on them).
    assert _changed(lambda cfg: cfg["moe"].update(capacity_factor=2.0)) == (
        {"upcycled_stable", "upcycled_final", "scratch_stable", "scratch_final", "aggregate"}
    )
    # The router init: the upcycling and what follows it.
    assert _changed(lambda cfg: cfg["moe"].update(router_init_std=0.01)) == (
        {"transform", "upcycled_stable", "upcycled_final", "scratch_stable", "scratch_final", "aggregate"}
    )
    # The fit's bootstrap: the fit alone (the report follows through its input).
    assert _changed(lambda cfg: cfg["fit"].update(bootstrap=7)) == {"fit"}
    # How a job runs changes no result: nothing.
    assert _changed(lambda cfg: cfg["training"].update(log_every_steps=3, checkpoint_every_tokens=4096)) == set()
    assert _changed(lambda cfg: cfg["slurm"].update(partition="gpu", signal_seconds_before_limit=60)) == set()
    # The corpus: everything downstream of the tokens.
    assert _changed(lambda cfg: cfg["corpus"].update(split_seed=5)) == set(RULES) - {"fit", "report"}


def test_a_job_found_by_its_wildcards_and_an_unknown_one_named():
    inventory = _inventory()
    job = inventory.find(
        "upcycled_final", {"size": "xs", "seed": "0", "d1": "131072", "variant": "e4_k2_g1", "d2": "65536"}
    )
    assert job.spec["end_tokens"] == 65536 and job.spec["coords"]["d1_tokens"] == 131072
    assert job.spec["start"]["checkpoint"].endswith("d1_131072/e4_k2_g1/stable_52428")
    with pytest.raises(UnknownJob, match="no dense_final job with size=xs, seed=0, d1=5"):
        inventory.find("dense_final", {"size": "xs", "seed": "0", "d1": "5"})
