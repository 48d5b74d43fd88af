"""The typed job contract (upcycling.core.spec): every training job's spec survives JSON unchanged,
a start point is one of three, a spec that breaks the contract is refused with one error naming
the key, and every job's Snakemake params are the bytes they were (a finished run stays "nothing
to be done").

tests/data/job_params.json holds the sha256 of every job's params for the repo's configs, taken
before the typed spec existed. A change that means to rerun jobs rewrites it:
``UPCYCLING_WRITE_PARAMS_GOLDEN=1 pytest tests/unit/test_spec.py -k bytes`` (and the README says
which jobs rerun, and why).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from functools import cache
from pathlib import Path

import pytest

from upcycling.core.errors import InputError
from upcycling.core.fingerprint import canonical_json
from upcycling.core.spec import (
    Fresh,
    FromCheckpoint,
    FromExport,
    Progress,
    SpecError,
    TrainingSettings,
    TrainSpec,
    start_point,
)
from upcycling.pipeline.jobs import Inventory
from upcycling.sweep.load import load_sweep

REPO = Path(__file__).resolve().parents[2]
CONFIGS = ("config/config.yaml", "config/bootstrapped.yaml", "config/paper.yaml", "tests/configs/tiny.yaml")
GOLDEN = REPO / "tests" / "data" / "job_params.json"


@cache
def inventory(config: str) -> Inventory:
    """The config's jobs as `upcycling plan` plans them (the corpus found from the repo)."""
    return Inventory(load_sweep(REPO / config, base_dir=REPO, check_corpus=False), REPO)


def training_jobs(config: str) -> list:
    return [job for job in inventory(config).jobs if job.phase is not None]


def tiny_spec() -> dict:
    """A training job's spec as the params spell it: the tiny sweep's upcycled stable job."""
    job = next(job for job in training_jobs("tests/configs/tiny.yaml") if job.rule == "upcycled_stable")
    return json.loads(job.params)


# ----------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("config", ["tests/configs/tiny.yaml", "config/config.yaml"])
def test_every_training_spec_survives_json_byte_for_byte(config):
    jobs = training_jobs(config)
    assert {job.rule.rpartition("_")[2] for job in jobs} == {"stable", "final"}
    for job in jobs:
        spec = TrainSpec.from_json(job.params)
        assert spec == job.train_spec, job.label
        assert spec.to_json() == job.params, job.label
        assert spec.fingerprint == job.fingerprint, job.label
        assert TrainSpec.from_json(json.loads(job.params)).to_json() == job.params  # a mapping too


def test_every_start_point_kind_is_planned_and_spelled_as_before():
    starts = {type(job.train_spec.start) for job in training_jobs("tests/configs/tiny.yaml")}
    assert starts == {Fresh, FromCheckpoint, FromExport}
    for job in training_jobs("tests/configs/tiny.yaml"):
        start, spelled = job.train_spec.start, json.loads(job.params)["start"]
        assert start.to_dict() == spelled and start_point(spelled) == start


def test_a_float_given_as_an_integer_stays_an_integer():
    spec = tiny_spec()
    spec["model"]["rope_theta"] = 10000  # YAML's `rope_theta: 10000`
    spec["training"]["lr"] = 1
    assert TrainSpec.from_json(spec).to_json() == canonical_json(spec)


def test_every_jobs_params_are_the_bytes_they_were():
    """Every job of the repo's configs, tokens stage to report, against the recorded params."""
    current = {
        config: {job.label: hashlib.sha256(job.params.encode()).hexdigest() for job in inventory(config).jobs}
        for config in CONFIGS
    }
    if os.environ.get("UPCYCLING_WRITE_PARAMS_GOLDEN"):
        GOLDEN.write_text(json.dumps(current, indent=1, sort_keys=True) + "\n")
        pytest.skip(f"wrote {GOLDEN}")
    golden = json.loads(GOLDEN.read_text())
    for config in CONFIGS:
        assert sorted(current[config]) == sorted(golden[config]), f"{config}: other jobs than recorded"
        changed = sorted(label for label, digest in current[config].items() if digest != golden[config][label])
        if changed:
            first = next(job for job in inventory(config).jobs if job.label == changed[-1])
            pytest.fail(
                f"{config}: {len(changed)} jobs' params changed, so Snakemake would rerun them and their "
                f"downstream: {changed[:5]}...; {first.label}'s params now: {first.params[:1500]}"
            )


# ----------------------------------------------------------------------------- start points


def test_start_points():
    assert start_point({}) == Fresh() and Fresh().to_dict() == {}
    assert start_point({"checkpoint": "a/stable_1"}) == FromCheckpoint("a/stable_1")
    assert start_point({"export": "b/init"}) == FromExport("b/init")
    assert FromExport("b/init").to_dict() == {"export": "b/init"}
    for bad, key in (
        ({"checkpoint": "a", "export": "b"}, "start"),
        ({"resume": "a"}, "start.resume"),
        ({"export": 3}, "start.export"),
        ("fresh", "start"),
    ):
        with pytest.raises(SpecError, match=f"key '{key}'"):
            start_point(bad)


# ----------------------------------------------------------------------------- refusals


def refusal(spec) -> str:
    with pytest.raises(InputError) as caught:
        TrainSpec.from_json(spec)
    assert isinstance(caught.value, SpecError)
    message = str(caught.value)
    assert "\n" not in message and "upcycling train --config" in message  # one line, with the fix
    return message


def test_a_missing_key_is_named():
    spec = tiny_spec()
    del spec["end_tokens"]
    assert "key 'end_tokens' is missing" in refusal(spec)
    spec = tiny_spec()
    del spec["training"]["lr"]
    assert "key 'training.lr' is missing" in refusal(spec)


def test_an_unknown_key_is_named():
    spec = tiny_spec()
    spec["end_token"] = 5
    assert "key 'end_token' is unknown" in refusal(spec)
    spec = tiny_spec()
    spec["model"]["layers"] = 2
    assert "key 'model.layers' is unknown" in refusal(spec)


@pytest.mark.parametrize(
    "path, value, expected",
    [
        (("seed",), "0", "expected an integer"),
        (("end_tokens",), 1.5, "expected an integer"),
        (("training", "lr"), "3e-3", "expected a number"),
        (("training", "compile"), 0, "expected true or false"),
        (("training", "adam_betas"), [0.9], "has 1 items, expected 2"),
        (("model", "explicit_head_dim"), "8", "expected an integer or null"),
        (("moe",), [1], "is a list, expected an object"),
        (("decay",), 5, "is 5, expected a list"),
        (("coords",), {"size": "xs"}, "'coords.init', 'coords.method'"),
        (("start",), {"export": 3}, "expected a path"),
    ],
)
def test_a_wrong_type_is_named(path, value, expected):
    spec = tiny_spec()
    spec.setdefault("coords", None)
    target = spec
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    message = refusal(spec)
    assert f"'{'.'.join(path)}" in message and expected in message, message


def test_every_problem_in_one_error():
    spec = tiny_spec()
    del spec["seed"]
    spec["extra"] = 1
    spec["training"]["lr"] = None
    message = refusal(spec)
    assert all(part in message for part in ("'seed' is missing", "'extra' is unknown", "'training.lr' is null"))


def test_text_that_is_not_json_or_not_an_object():
    assert "is not JSON" in refusal("{'job': 1}")
    assert "key '<top level>' is a list, expected an object" in refusal("[]")


# ----------------------------------------------------------------------------- settings and progress


def test_training_settings_are_the_sweeps_result_keys():
    from upcycling.pipeline.jobs import RESULT_TRAINING_KEYS

    spec = TrainSpec.from_json(tiny_spec())
    assert tuple(spec.training.to_dict()) == RESULT_TRAINING_KEYS
    assert isinstance(spec.training, TrainingSettings) and spec.training.adam_betas == (0.9, 0.95)


def test_the_model_shape_is_the_model_config_less_its_vocabulary():
    import dataclasses

    from upcycling.core.spec import ModelShape
    from upcycling.model.flops import ModelConfig  # no torch: flops is pure

    assert [field.name for field in dataclasses.fields(ModelConfig) if field.name != "vocab_size"] == [
        field.name for field in dataclasses.fields(ModelShape)
    ]


def test_progress_round_trips_the_client_state_it_was_saved_as():
    state = {
        "tokens": 512,
        "step": 2,
        "curve": {"tokens": [0, 512], "val_loss": [6.2, 5.9]},
        "train_curve": {"tokens": [256, 512], "loss": [6.1, 6.0]},
        "wall_time_s": 1.5,
        "expert_load": [[0.25, 0.75]],
    }
    progress = Progress.from_dict(state)
    assert progress.tokens == 512 and progress.val_loss == (6.2, 5.9) and progress.expert_load == ((0.25, 0.75),)
    assert progress.to_dict() == state
    assert Progress().to_dict()["curve"] == {"tokens": [], "val_loss": []}
    broken = copy.deepcopy(state)
    del broken["curve"]["val_loss"]
    with pytest.raises(SpecError, match="key 'curve.val_loss' is missing"):
        Progress.from_dict(broken, "checkpoint x")
