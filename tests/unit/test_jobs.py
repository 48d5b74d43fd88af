"""The job inventory: one list of jobs for the Snakefile, `upcycling plan` and the resources, with a
spec per job that holds exactly what its result depends on."""

from __future__ import annotations

import copy

import pytest
import yaml

from tiny_sweep import REPO
from upcycling.core.spec import FromCheckpoint
from upcycling.pipeline.jobs import RULES, Inventory, UnknownJob
from upcycling.sweep.load import sweep_from_mapping

DEFAULT = yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def _inventory(mutate=None) -> Inventory:
    mapping = copy.deepcopy(DEFAULT)
    if mutate:
        mutate(mapping)
    return Inventory(sweep_from_mapping(mapping, REPO))


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
    spec = job.train_spec
    assert spec.end_tokens == 65536 and spec.coords is not None and spec.coords.d1_tokens == 131072
    assert isinstance(spec.start, FromCheckpoint) and spec.start.path.endswith("d1_131072/e4_k2_g1/stable_52428")
    with pytest.raises(UnknownJob, match="no dense_final job with size=xs, seed=0, d1=5"):
        inventory.find("dense_final", {"size": "xs", "seed": "0", "d1": "5"})
