"""Slurm support without a cluster: the Slurm -> torch.distributed mapping, the resources the
Slurm plugin turns into sbatch lines, the sweep plan and the preflight checks (pure functions)."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from tiny_sweep import REPO
from upcycling.cluster import launch
from upcycling.cluster.plan import format_plan, plan
from upcycling.cluster.preflight import Cluster, Node, Partition, problems
from upcycling.cluster.resources import job_resources, launch_resources, launcher, training_resources
from upcycling.pipeline import jobargs
from upcycling.pipeline.jobs import RULES, TRAINING_RULES, Inventory
from upcycling.sweep.load import load_sweep, sweep_from_mapping

PAPER = REPO / "config" / "paper.yaml"
SLURM_TINY = REPO / "tests" / "configs" / "slurm_tiny.yaml"


def _sweep(path=PAPER, **slurm):
    mapping = yaml.safe_load(Path(path).read_text())
    mapping.setdefault("slurm", {}).update(slurm)
    return sweep_from_mapping(mapping, REPO, check_corpus=False)


STEP = {
    "SLURM_JOB_ID": "123456",
    "SLURM_JOB_NODELIST": "gpu[017-018]",
    "SLURM_STEP_ID": "0",
    "SLURM_STEP_NUM_TASKS": "8",
    "SLURM_NTASKS": "8",
    "SLURM_STEP_NUM_NODES": "2",
    "SLURM_JOB_NUM_NODES": "2",
    "SLURM_PROCID": "5",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
}


def _slurm_environ(monkeypatch, environ):
    for key in [key for key in os.environ if key.startswith("SLURM_")] + ["RANK", "MASTER_ADDR", "MASTER_PORT"]:
        monkeypatch.delenv(key, raising=False)
    for key, value in environ.items():
        monkeypatch.setenv(key, value)


def test_a_step_task_gets_its_rank_from_slurm(monkeypatch):
    _slurm_environ(monkeypatch, STEP)
    env = launch.slurm_torch_env()
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"]) == ("5", "8", "1", "4")
    assert env["MASTER_ADDR"] == "gpu017"  # the job's first host, expanded from Slurm's node list
    # Every rank of the job derives the same master address and port.
    _slurm_environ(monkeypatch, {**STEP, "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"})
    other = launch.slurm_torch_env()
    assert (other["MASTER_ADDR"], other["MASTER_PORT"]) == (env["MASTER_ADDR"], env["MASTER_PORT"])
    _slurm_environ(monkeypatch, {**STEP, "MASTER_PORT": "29500"})  # a port already given wins
    assert launch.slurm_torch_env()["MASTER_PORT"] == "29500"


def test_one_process_outside_a_multi_task_step(monkeypatch):
    """The batch script (no SLURM_STEP_ID) says NTASKS=8 but is one process; a one-task step and a
    launcher that set RANK (torchrun) are left to themselves."""
    batch = {key: value for key, value in STEP.items() if not key.startswith("SLURM_STEP")}
    for environ in (batch, {**STEP, "SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "1"}, {**STEP, "RANK": "0"}, {}):
        _slurm_environ(monkeypatch, environ)
        assert launch.slurm_torch_env() == {}


def test_a_submitted_task_ignores_the_submitter_s_rendezvous(monkeypatch):
    """sbatch exports the submitting process's environment: a RANK and MASTER_PORT left there by a
    process that ran torch.distributed (the port still in use) must not reach the task's trainer."""
    submitter = {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "34667", "PATH": "/bin"}
    task = launch.TrainingTask("config.yaml", ["--family", "dense"], "/work")
    _slurm_environ(monkeypatch, {})
    env = task.child_env(submitter)
    assert env["PATH"] == "/bin" and not set(launch.RENDEZVOUS) & set(env)
    # In a multi-task step the ranks come from Slurm; a port the caller passes still wins.
    _slurm_environ(monkeypatch, STEP)
    env = launch.TrainingTask("config.yaml", [], "/work", env={"MASTER_PORT": "29400"}).child_env({**STEP, **submitter})
    assert (env["RANK"], env["WORLD_SIZE"], env["MASTER_PORT"]) == ("5", "8", "29400")


def test_launcher_and_launch_resources():
    assert launcher(_sweep(gpus_per_job=1)) == "" and launcher(_sweep(gpus_per_job=0)) == ""
    assert launcher(_sweep(gpus_per_job=16, nodes=2)) == (
        "srun --nodes=2 --ntasks-per-node=8 --kill-on-bad-exit=1 --cpus-per-task=4"
    )

    def launch_for(gpus, nodes):
        return launch_resources(_sweep(gpus_per_job=gpus, nodes=nodes))

    # One process: the plugin starts it; GPUs as --gpus.
    assert launch_for(1, 1) == {"nodes": 1, "gpu": 1} and launch_for(0, 1) == {"nodes": 1, "gpu": 0}
    # Several: the rule's srun starts them (mpi), with the task count sbatch must reserve.
    assert launch_for(8, 1) == {"nodes": 1, "gpu": 8, "mpi": "srun", "tasks_per_node": 8}
    # Several nodes: GPUs per node (--gres), never a --gpus total Slurm could spread unevenly.
    assert launch_for(16, 2) == {"nodes": 2, "gpu": 0, "gres": "gpu:8", "mpi": "srun", "tasks_per_node": 8}
    assert launch_for(2, 2) == {"nodes": 2, "gpu": 0, "gres": "gpu:1", "mpi": "srun", "tasks": 2, "tasks_per_gpu": 1}


class _Resources(dict):
    __getattr__ = dict.__getitem__  # the plugin reads resources both ways


def _sbatch_line(resources: dict) -> str:
    """The sbatch command the Slurm plugin builds from a training job's resources."""
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    ours = ("launcher", "run_options")  # read by the rule's shell command, not by the plugin
    job = SimpleNamespace(resources=_Resources({k: v for k, v in resources.items() if k not in ours}), threads=1)
    params = dict(run_uuid="run", slurm_logfile="log", comment_str="rule", account="", partition="", workdir="/w")
    return get_submit_command(job, params) + set_gres_string(job)


def _first(sweep, rule):
    return Inventory(sweep).of_rule(rule)[0]


def test_the_plugin_turns_multi_gpu_resources_into_one_task_per_gpu():
    sweep = _sweep()
    line = _sbatch_line(job_resources(sweep, _first(sweep, "upcycled_final"))).split()
    assert {"--nodes=1", "--ntasks-per-node=8", "--cpus-per-task=4", "--gpus=8", "--signal=USR1@600"} <= set(line)
    sweep = _sweep(gpus_per_job=16, nodes=2)
    line = _sbatch_line(job_resources(sweep, _first(sweep, "dense_final")))
    assert {"--nodes=2", "--ntasks-per-node=8", "--gres=gpu:8"} <= set(line.split()) and "--gpus" not in line


def test_runtime_leaves_room_for_the_warning_signal():
    """The job must finish its tokens before USR1 arrives; memory grows with processes per node."""
    slurm = dict(
        throughput_tokens_per_s={"xs": 1000}, runtime_margin=1.0, startup_minutes=0, signal_seconds_before_limit=600
    )
    one = _sweep(SLURM_TINY, gpus_per_job=1, **slurm)
    job = _first(one, "dense_final")
    resources = training_resources(one, job)
    assert resources["runtime"] == math.ceil(job.tokens / 1000 / 60 + 10)
    assert resources["slurm_extra"] == "--signal=USR1@600"
    four = _sweep(SLURM_TINY, gpus_per_job=4, **slurm)
    assert training_resources(four, job)["runtime"] <= resources["runtime"]
    # GPU processes keep their state on the GPU: host memory grows by one runtime per process.
    assert training_resources(four, job)["mem_mb"] - resources["mem_mb"] == 3 * 6000


def test_submit_cli_parses_training_arguments():
    parser = __import__("argparse").ArgumentParser()
    launch.add_arguments(parser)
    args = parser.parse_args(
        ["--config", "c.yaml", "--timeout-min", "30", "--", "--family", "dense", "--size", "xs", "--budget", "8192"]
    )
    assert args.timeout_min == 30 and args.train_args[-2:] == ["--budget", "8192"]
    assert jobargs.job_key(jobargs.parse(args.train_args[1:])) == (
        "dense_final",
        {"size": "xs", "seed": "0", "d1": "8192"},
    )
    with pytest.raises(ValueError):
        jobargs.parse(["--family", "dense", "--size", "xs"])


def test_plan_of_the_paper_config():
    sweep = _sweep()  # its corpus (/data/corpus) need not exist
    result = plan(sweep)
    rules, inventory = result["rules"], Inventory(sweep)
    for rule in RULES:
        assert rules[rule]["jobs"] == len(inventory.of_rule(rule)), rule
    training = [job for job in result["jobs"] if "expected_hours" in job]
    assert len(training) == sum(rules[rule]["jobs"] for rule in TRAINING_RULES)
    for job in training:
        res = job["resources"]
        assert res["runtime"] > 0 and res["mem_mb"] > 0 and res["gpu"] == sweep.slurm.gpus_per_job
        # One process per GPU, each with its own CPUs, started by the rule's srun.
        assert res["nodes"] == 1 and res["cpus_per_task"] == sweep.slurm.cpus_per_gpu
        assert job["checkpoint_bytes"] > 0
    for key in ("requested_gpu_hours", "expected_gpu_hours"):
        assert math.isfinite(result["totals"][key]) and result["totals"][key] > 0
    # Requested time carries the margin and start-up: more than the compute itself.
    assert result["totals"]["requested_gpu_hours"] > result["totals"]["expected_gpu_hours"]
    # Disk: the largest checkpoint (1.4B dense + 8 experts, bf16 + fp32 Adam: 14 bytes/param) is tens of GB.
    assert 2e10 < result["totals"]["largest_checkpoint"]["bytes"] < 2e11
    assert result["totals"]["disk_peak_bytes"] > result["totals"]["disk_lasting_bytes"] > 0
    # Paper scale: D into the tens of billions, models from ~100M to over 1B parameters.
    assert max(sweep.sweep.d1_tokens) >= 10**10 and max(sweep.sweep.d2_tokens) >= 10**10
    text = format_plan(result)
    assert "GPU-hours requested" in text and "Largest checkpoint" in text and "Disk:" in text
    for rule in ("tokenize", "dense_stable", "upcycled_final", "report"):
        assert re.search(rf"^{rule}\s+{rules[rule]['jobs']}\s", text, re.M), rule


def test_paper_config_model_sizes():
    from upcycling.model.flops import count_params
    from upcycling.sweep.models import model_config

    sweep = _sweep()
    totals = [count_params(model_config(sweep, size, sweep.tokenizer.vocab_size)).total for size in sweep.dense_models]
    assert len(totals) == 4 and totals == sorted(totals)
    assert 80e6 < totals[0] < 200e6 and totals[-1] > 1e9


def test_plan_config_checks_still_apply(tmp_path):
    """Only the corpus checks are skipped: a bad sweep still fails."""
    from upcycling.sweep.load import ConfigError

    cfg = yaml.safe_load(PAPER.read_text())
    cfg["sweep"]["top_k"] = [16]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="k <= E"):
        load_sweep(bad, check_corpus=False)


def test_preflight_names_the_key_for_every_job_the_cluster_cannot_run():
    cpu_only = Cluster(
        partitions={"cpu": Partition("cpu", ("n1", "n2"), 60.0, default=True)},
        nodes={"n1": Node("n1", 2, 8000, 0), "n2": Node("n2", 16, 64000, 0)},
        accounts=frozenset({"physics"}),
    )
    tiny = Inventory(_sweep(SLURM_TINY, gpus_per_job=0))
    assert problems(tiny, cpu_only) == []
    gpu_sweep = Inventory(_sweep(SLURM_TINY, gpus_per_job=1))
    assert any(
        line.startswith("slurm.gpus_per_job:") and "set slurm.gpus_per_job: 0" in line
        for line in problems(gpu_sweep, cpu_only)
    )
    paper = Inventory(_sweep(PAPER, account="chemistry", partition="gpu"))
    found = problems(paper, cpu_only)
    assert found[0].startswith("slurm.account: account 'chemistry' does not exist")
    assert any(line.startswith("slurm.partition: partition 'gpu' does not exist") for line in found)
    paper = Inventory(_sweep(PAPER, partition="cpu", account="physics"))
    found = "\n".join(problems(paper, cpu_only))
    assert "no node of partition 'cpu' has any (GRES gpu)" in found
    assert "slurm.cpus_per_gpu:" in found and "over partition 'cpu''s MaxTime of 60 min" in found
    assert "dense_models.1400m: dense_stable jobs ask" in found and "spread the job over more GPUs" in found
