"""The trainer on the real DeepSpeed engine: schedules, exact token budgets, preemption and resume,
divergence, data and expert parallelism under torchrun."""

from __future__ import annotations

import random
import re
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

import faults
from tiny_sweep import cli_env, read_json, run_cli, write_config
from upcycling.model.export import load_hf
from upcycling.model.flops import count_params
from upcycling.train.loop import EXIT_PREEMPTED

SEQ, ROWS = 32, 8
STEP_TOKENS = SEQ * ROWS
# WSD points of the tiny config: D = 8192 and 16384 tokens, decay over the last 25%.
STABLE_1, D1_SMALL = 6144, 8192


def train(workdir, *args, check=True, **env):
    return run_cli(["train", "--config", str(workdir / "config.yaml"), *args], cwd=workdir, check=check, **env)


def dense(workdir, *args, **kwargs):
    return train(workdir, "--family", "dense", "--size", "xs", *args, **kwargs)


# ----------------------------------------------------------------------------- runs


@pytest.mark.slow  # trainer runs of 10 s or more
def test_dense_run_meets_its_budget_exactly_and_writes_the_contract(tiny_workdir):
    dense(tiny_workdir, "--stable", str(STABLE_1))
    stable = tiny_workdir / "results/checkpoints/dense/xs/seed0" / f"stable_{STABLE_1}"
    manifest = read_json(stable / "manifest.json")
    assert manifest["tokens"] == STABLE_1 and manifest["complete"]
    assert manifest["written_by"] == f"dense_stable[size=xs,seed=0,point={STABLE_1}]"
    assert not stable.with_name(stable.name + ".partial").exists()  # published by one rename
    dense(tiny_workdir, "--budget", str(D1_SMALL))
    metrics = read_json(tiny_workdir / "results/dense/xs/seed0/d1_8192/metrics.json")
    assert metrics["tokens_seen"] == D1_SMALL
    assert metrics["coords"] == {
        "size": "xs",
        "init": "dense",
        "method": "dense",
        "seed": 0,
        "d1_tokens": D1_SMALL,
        "d2_tokens": 0,
        "experts": 1,
        "top_k": 1,
        "granularity": 1,
    }
    assert metrics["curve"]["tokens"][0] == 0 and metrics["curve"]["tokens"][-1] == D1_SMALL
    # The decay job continues the stable job's curve (evaluations every 4096 tokens and at each
    # job's end), and training lowers the held-out loss.
    assert metrics["curve"]["tokens"] == [0, 4096, STABLE_1, D1_SMALL]
    assert metrics["final_val_loss"] < metrics["curve"]["val_loss"][0] - 0.5
    # A final job leaves no checkpoint behind (training.keep_final_checkpoints is off).
    assert not list((tiny_workdir / "results/checkpoints/dense/xs/seed0").glob("d1_*"))
    assert metrics["flops"] > 6 * metrics["non_embedding_params"] * D1_SMALL
    assert (tiny_workdir / "results/dense/xs/seed0/d1_8192/hf/model.safetensors").is_file()


def test_budget_that_is_not_a_multiple_of_the_batch_is_met_exactly(tmp_path, make_workdir):
    budget = 5 * STEP_TOKENS + 77
    # A checkpoint at every step: the saves must not add to the run's wall time.
    make_workdir(
        tmp_path,
        {"training": {"schedule": "cosine", "checkpoint_every_tokens": STEP_TOKENS}, "sweep": {"d1_tokens": [budget]}},
    )
    result = dense(tmp_path, "--budget", str(budget))
    metrics = read_json(tmp_path / f"results/dense/xs/seed0/d1_{budget}/metrics.json")
    assert metrics["tokens_seen"] == budget == metrics["train_curve"]["tokens"][-1]
    assert len(metrics["train_curve"]["tokens"]) == 6
    job_seconds = float(re.search(rf"done, {budget} tokens in ([0-9.]+)s", result.stdout).group(1))
    assert metrics["wall_time_s"] == pytest.approx(job_seconds, abs=0.1 + 0.05 * job_seconds)


def _final_weights(workdir):
    return load_file(str(workdir / "results/dense/xs/seed0/d1_8192/hf/model.safetensors"))


@pytest.mark.slow  # six CLI runs
def test_preempted_run_resumes_to_the_same_weights_bitwise(tmp_path, make_workdir):
    runs = {name: make_workdir(tmp_path / name) for name in ("straight", "interrupted")}
    dense(runs["straight"], "--stable", str(STABLE_1))
    dense(runs["straight"], "--budget", str(D1_SMALL))

    # SIGUSR1 at a random step of the stable job, and at a step of the decay job.
    stable_steps = STABLE_1 // STEP_TOKENS
    stop_step = random.Random().randint(1, stable_steps - 1)
    result = dense(runs["interrupted"], "--stable", str(STABLE_1), check=False, **faults.env(signal_at_step=stop_step))
    assert result.returncode == EXIT_PREEMPTED, result.stdout[-2000:]
    assert "SIGUSR1 received" in result.stdout
    assert not (runs["interrupted"] / f"results/checkpoints/dense/xs/seed0/stable_{STABLE_1}").exists()
    resumed = dense(runs["interrupted"], "--stable", str(STABLE_1))
    assert f"resumed its own checkpoint at {stop_step * STEP_TOKENS} tokens" in resumed.stdout
    result = dense(
        runs["interrupted"], "--budget", str(D1_SMALL), check=False, **faults.env(signal_at_step=stable_steps + 2)
    )
    assert result.returncode == EXIT_PREEMPTED
    dense(runs["interrupted"], "--budget", str(D1_SMALL))

    straight, interrupted = _final_weights(runs["straight"]), _final_weights(runs["interrupted"])
    assert straight.keys() == interrupted.keys()
    for name in straight:
        assert torch.equal(straight[name], interrupted[name]), name
    metrics = [read_json(w / "results/dense/xs/seed0/d1_8192/metrics.json") for w in runs.values()]
    assert metrics[0]["final_val_loss"] == metrics[1]["final_val_loss"]
    assert metrics[0]["curve"] == metrics[1]["curve"]


def test_divergence_stops_the_run_without_metrics(tiny_workdir):
    result = dense(tiny_workdir, "--stable", str(STABLE_1), check=False, **faults.env(nan_at_step=3))
    assert result.returncode == 3
    assert "dense/xs/seed0/stable_6144 diverged at step 3" in result.stdout
    assert not (tiny_workdir / f"results/checkpoints/dense/xs/seed0/stable_{STABLE_1}").exists()


@pytest.mark.slow  # trainer runs of 10 s or more
def test_scratch_moe_preempted_and_resumed_equals_straight_run(tmp_path, make_workdir):
    finals = []
    for name, fault in (("straight", None), ("interrupted", "5")):
        workdir = make_workdir(tmp_path / name, {"training": {"schedule": "cosine"}})
        args = ["--family", "scratch", "--size", "xs", "--experts", "4", "--top-k", "2", "--budget", "8192"]
        if fault:
            result = train(workdir, *args, check=False, **faults.env(signal_at_step=fault))
            assert result.returncode == EXIT_PREEMPTED
        train(workdir, *args)
        finals.append(read_json(workdir / "results/scratch/xs/seed0/e4_k2_g1/d_8192/metrics.json"))
    assert finals[0]["final_val_loss"] == finals[1]["final_val_loss"]
    assert finals[0]["train_curve"] == finals[1]["train_curve"]
    load = finals[0]["expert_load"]
    assert len(load) == 2 and all(len(layer) == 4 and abs(sum(layer) - 1) < 1e-6 for layer in load)
    assert finals[0]["active_params"] < finals[0]["n_params"]


def _torchrun(workdir, *args, nproc=2):
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "upcycling.cli",
        "train",
        "--config",
        str(workdir / "config.yaml"),
        *args,
    ]
    result = subprocess.run(command, cwd=workdir, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _setup(make_workdir, workdir, overrides):
    """A cosine-schedule workdir (the runs compare whole curves) with overrides merged in."""
    return make_workdir(
        workdir,
        {
            "training": {"schedule": "cosine", **overrides.get("training", {})},
            **{k: v for k, v in overrides.items() if k != "training"},
        },
    )


@pytest.mark.slow
def test_data_parallel_two_processes_match_one(tmp_path, make_workdir):
    """2 ranks x 4 rows see the same global batch as 1 rank x 8 rows: same losses."""
    one = _setup(make_workdir, tmp_path / "one", {})
    two = _setup(make_workdir, tmp_path / "two", {"training": {"micro_batch_size": ROWS // 2}})
    dense(one, "--budget", str(D1_SMALL))
    _torchrun(two, "--family", "dense", "--size", "xs", "--budget", str(D1_SMALL))
    single, parallel = (read_json(w / "results/dense/xs/seed0/d1_8192/metrics.json") for w in (one, two))
    assert parallel["tokens_seen"] == single["tokens_seen"] == D1_SMALL
    assert parallel["train_curve"]["loss"] == pytest.approx(single["train_curve"]["loss"], abs=2e-4)
    assert parallel["final_val_loss"] == pytest.approx(single["final_val_loss"], abs=2e-4)


@pytest.mark.slow
def test_expert_parallel_two_processes_match_one(tmp_path, make_workdir):
    """ep_size=2 over 2 ranks (each holds 2 of the 4 experts) trains like ep_size=1 on one rank.

    The load-balancing loss is computed over each rank's own tokens (as in GShard and DeepSpeed),
    so it is not the same function of a batch split over two ranks: it is off here."""
    one = _setup(make_workdir, tmp_path / "one", {"moe": {"aux_loss_coef": 0.0}})
    two = _setup(
        make_workdir,
        tmp_path / "two",
        {"training": {"micro_batch_size": ROWS // 2}, "moe": {"ep_size": 2, "aux_loss_coef": 0.0}},
    )
    args = ["--family", "scratch", "--size", "xs", "--experts", "4", "--top-k", "2", "--budget", "8192"]
    train(one, *args)
    _torchrun(two, *args)
    single, parallel = (read_json(w / "results/scratch/xs/seed0/e4_k2_g1/d_8192/metrics.json") for w in (one, two))
    assert parallel["train_curve"]["loss"] == pytest.approx(single["train_curve"]["loss"], abs=2e-4)
    assert parallel["final_val_loss"] == pytest.approx(single["final_val_loss"], abs=2e-4)


@pytest.mark.slow  # trainer runs of 10 s or more
def test_upcycled_run_starts_at_the_dense_loss_with_copied_adam_moments(tmp_path, make_workdir):
    """dense -> transform (upcycle) -> MoE through the CLI: the MoE's first evaluation equals the dense model's
    last (function preservation end to end), and its optimizer starts from the dense moments."""
    workdir = _setup(
        make_workdir, tmp_path / "run", {"training": {"precision": "fp32"}, "moe": {"copy_optimizer_state": True}}
    )
    dense(workdir, "--budget", str(D1_SMALL))
    export = workdir / "results/dense/xs/seed0/d1_8192/hf"
    assert (export / "optimizer.safetensors").is_file()
    run_cli(
        [
            "transform",
            "--config",
            str(workdir / "config.yaml"),
            "--size",
            "xs",
            "--d1",
            str(D1_SMALL),
            "--variant",
            "e4_k2_g1",
        ],
        cwd=workdir,
    )
    init = workdir / "results/upcycled/xs/seed0/d1_8192/e4_k2_g1/init"
    assert (init / "optimizer.safetensors").is_file()
    result = train(
        workdir,
        "--family",
        "upcycled",
        "--d1",
        str(D1_SMALL),
        "--size",
        "xs",
        "--experts",
        "4",
        "--top-k",
        "2",
        "--budget",
        "8192",
    )
    assert "optimizer starts from copied Adam moments" in result.stdout
    dense_metrics = read_json(workdir / "results/dense/xs/seed0/d1_8192/metrics.json")
    moe_metrics = read_json(workdir / "results/upcycled/xs/seed0/d1_8192/e4_k2_g1/d2_8192/metrics.json")
    assert moe_metrics["curve"]["val_loss"][0] == pytest.approx(dense_metrics["final_val_loss"], abs=1e-5)
    assert moe_metrics["coords"]["d1_tokens"] == D1_SMALL and moe_metrics["coords"]["d2_tokens"] == 8192
    assert moe_metrics["dense_params"] == dense_metrics["n_params"]
    assert moe_metrics["final_val_loss"] < dense_metrics["final_val_loss"]


@pytest.mark.slow  # trainer runs of 10 s or more
def test_calibrate_writes_the_measured_throughput_into_the_config(tmp_path):
    config = write_config(tmp_path)
    before = yaml.safe_load(config.read_text())
    run_cli(["calibrate", "--config", str(config), "--steps", "1", "--write"], cwd=tmp_path)
    after = yaml.safe_load(config.read_text())
    measured = after["slurm"].pop("throughput_tokens_per_s")
    assert set(measured) == set(before["dense_models"]) and all(rate > 0 for rate in measured.values())
    assert after["slurm"].pop("moe_throughput_factor") > 0
    before["slurm"].pop("throughput_tokens_per_s", None)
    assert after == before  # every other setting kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]  # no temporary left beside it


@pytest.mark.slow  # trainer runs of 10 s or more
def test_grown_model_trains_in_deepspeed_from_the_dense_loss(tmp_path, make_workdir):
    """dense run -> `upcycling transform` (grow_width) -> the real trainer, as the DAG runs them:
    the grown run's first evaluation equals the dense run's last (function preservation end to
    end), then it learns."""
    overrides = {"training": {"schedule": "cosine", "precision": "fp32"}, "stage2": {"methods": ["grow_width"]}}
    config = make_workdir(tmp_path, overrides) / "config.yaml"
    run_cli(["train", "--config", str(config), "--family", "dense", "--size", "xs", "--budget", "8192"], cwd=tmp_path)
    run_cli(
        ["transform", "--config", str(config), "--size", "xs", "--d1", "8192", "--variant", "grow_width"], cwd=tmp_path
    )
    run_cli(
        [
            "train",
            "--config",
            str(config),
            "--family",
            "upcycled",
            "--method",
            "grow_width",
            "--size",
            "xs",
            "--d1",
            "8192",
            "--budget",
            "8192",
        ],
        cwd=tmp_path,
    )
    dense_metrics = read_json(tmp_path / "results/dense/xs/seed0/d1_8192/metrics.json")
    grown_metrics = read_json(tmp_path / "results/upcycled/xs/seed0/d1_8192/grow_width/d2_8192/metrics.json")
    assert grown_metrics["coords"]["method"] == "grow_width" and grown_metrics["coords"]["experts"] == 1
    assert grown_metrics["curve"]["val_loss"][0] == pytest.approx(dense_metrics["final_val_loss"], abs=1e-5)
    assert grown_metrics["final_val_loss"] < grown_metrics["curve"]["val_loss"][0]
    init = tmp_path / "results/upcycled/xs/seed0/d1_8192/grow_width/init"
    assert grown_metrics["n_params"] == count_params(load_hf(init)[1]).total > dense_metrics["n_params"]
