"""The config key of Drop-Upcycling, ``sweep.reinit_ratio``: a bad r is refused when the DAG is
built, naming the key and the fix; a good list gives one upcycled lineage per r, with r in its
paths, in its transform's options and in its runs' coordinates, and r = 0 exactly as before.
The refusal by Snakemake itself (a subprocess): tests/integration/test_reinit_dag.py."""

from __future__ import annotations

import copy
import json

import pytest
import yaml

from tiny_sweep import REPO, TINY_CONFIG
from upcycling.core.spec import TrainSpec
from upcycling.pipeline.jobs import jobs
from upcycling.sweep.load import ConfigError, load_sweep, sweep_from_mapping

TINY = yaml.safe_load(TINY_CONFIG.read_text())


def _sweep(ratios, **stage2):
    cfg = copy.deepcopy(TINY)
    cfg["sweep"]["reinit_ratio"] = ratios
    if stage2:
        cfg["stage2"] = stage2
    return sweep_from_mapping(cfg, REPO, check_corpus=False)


HINT = "a list of distinct numbers between 0 and 1, e.g. [0, 0.5]"  # the schema errors' fix


@pytest.mark.parametrize(
    "ratios,problem,fix",
    [
        ([-0.1], "less than the minimum of 0", HINT),
        ([0, 1.5], "greater than the maximum of 1", HINT),
        (["half"], "is not of type 'number'", HINT),
        ([True], "is not of type 'number'", HINT),
        ([0.5, 0.5], "non-unique", HINT),
        ([0, 0.0], "non-unique", HINT),
        (0.5, "not of type 'array'", HINT),
        ([], "non-empty", HINT),
        ([float("nan")], "NaN", "give numbers between 0 and 1"),
        ([0.5, 0.5000001], "would collide", "keep one of them"),
    ],
)
def test_a_bad_ratio_is_refused_naming_the_key_and_the_fix(ratios, problem, fix):
    with pytest.raises(ConfigError, match=problem) as refused:
        _sweep(ratios)
    assert "config key 'sweep.reinit_ratio" in str(refused.value) and fix in str(refused.value)


def test_a_ratio_above_zero_needs_moe_upcycle():
    with pytest.raises(ConfigError, match="sweep.reinit_ratio.*add moe_upcycle to stage2.methods"):
        _sweep([0, 0.5], methods=["continue"])
    assert _sweep([0], methods=["continue"]).sweep.reinit_ratio == (0,)


def test_the_default_is_plain_upcycling():
    assert load_sweep(TINY_CONFIG, base_dir=REPO, check_corpus=False).sweep.reinit_ratio == (0,)


def test_one_upcycled_lineage_per_ratio_carries_r_where_it_is_above_zero():
    plain = jobs(sweep_from_mapping(copy.deepcopy(TINY), REPO, check_corpus=False))  # no reinit_ratio key
    both = jobs(_sweep([0, 0.5]))
    by_label = {job.label: job for job in both}
    # r = 0: the same jobs, with the same params, as a sweep without the key (the aggregate, fit and
    # report embed the whole config, defaults included).
    assert all(
        by_label[job.label].params == job.params for job in plain if job.rule not in ("aggregate", "fit", "report")
    )
    dropped = [job for job in both if job.lineage is not None and job.lineage.reinit_ratio == 0.5]
    assert {job.rule for job in dropped} == {"transform", "upcycled_stable", "upcycled_final"}
    assert all(job.wildcards["variant"] == "e4_k2_g1_r0.5" and "/e4_k2_g1_r0.5/" in job.log for job in dropped)
    transforms = [json.loads(job.params) for job in dropped if job.rule == "transform"]
    assert transforms and all(spec["options"]["reinit_ratio"] == 0.5 for spec in transforms)
    finals = [job.train_spec for job in dropped if job.rule == "upcycled_final"]
    assert finals and all(spec.coords is not None and spec.coords.reinit_ratio == 0.5 for spec in finals)
    assert all(TrainSpec.from_json(spec.to_json()) == spec for spec in finals)  # what `upcycling train` reads
    assert all(json.loads(spec.to_json())["coords"]["reinit_ratio"] == 0.5 for spec in finals)
    plain_final = next(job for job in plain if job.rule == "upcycled_final")
    assert "reinit_ratio" not in json.loads(plain_final.params)["coords"]
    # Dense and from-scratch runs have no r: one of each, whatever the list.
    assert sum(job.rule == "scratch_final" for job in both) == sum(job.rule == "scratch_final" for job in plain)
    assert sum(job.rule == "upcycled_final" for job in both) == 2 * sum(job.rule == "upcycled_final" for job in plain)
