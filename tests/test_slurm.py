"""Slurm support: the Slurm -> torch.distributed mapping and the sweep plan (pure, no cluster), and
against a real single-node Slurm cluster on this machine (marker ``slurm``; the session fixture
starts it with scripts/slurm/start-local-cluster.sh and skips, saying why, when it cannot):

- submitit submits a function and a training job; the training job is interrupted the way a
  time-out is announced, checkpoints, requeues and resumes;
- srun starts a two-process training job whose ranks come from Slurm's variables;
- ``snakemake --profile profiles/slurm`` runs the tiny sweep end to end; one training job is
  cancelled with scancel while it runs, and the rerun redoes only it and what depends on it.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from conftest import REPO, cli_env, read_json, write_config
from upcycling.cluster import launch
from upcycling.cluster.plan import format_plan, plan
from upcycling.cluster.preflight import Cluster, Node, Partition, problems
from upcycling.cluster.resources import job_resources, launch_resources, launcher, training_resources
from upcycling.pipeline import jobargs
from upcycling.pipeline.jobs import RULES, TRAINING_RULES, Inventory
from upcycling.sweep.load import load_sweep, sweep_from_mapping

START = REPO / "scripts" / "slurm" / "start-local-cluster.sh"
SLURM_TINY = REPO / "tests" / "configs" / "slurm_tiny.yaml"
PAPER = REPO / "config" / "paper.yaml"


# ----------------------------------------------------------------------------- no cluster needed


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


def test_plan_cli_on_the_paper_config():
    result = subprocess.run(
        ["upcycling", "plan", "--config", str(PAPER)],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "GPU-hours requested" in result.stdout and "dense_stable" in result.stdout


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
    assert "MB per node (from their model size)" in found


# ----------------------------------------------------------------------------- the local cluster


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running local Slurm cluster (started here when needed), or a skip that says why."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip(
            "the local Slurm cluster needs root (start-local-cluster.sh installs packages and starts "
            "daemons); run the tests as root to include the Slurm tests"
        )
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        pytest.skip("Slurm is not installed and there is no apt-get to install it (Debian/Ubuntu needed)")
    started = time.monotonic()
    result = subprocess.run(["bash", str(START)], capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        pytest.skip(
            f"the local Slurm cluster did not come up (start-local-cluster.sh exited {result.returncode}): "
            f"{(result.stderr or result.stdout).strip()[-800:]}"
        )
    print(f"\nlocal Slurm cluster up in {time.monotonic() - started:.0f} s")
    return {"bring_up_s": time.monotonic() - started}


def slurm_env(**extra: str) -> dict:
    """What the submitting process exports to its jobs (sbatch --export=ALL): the venv first on
    PATH, DeepSpeed on CPU, the shared JIT cache."""
    env = cli_env(**extra)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    for key in [key for key in env if key.startswith(("SLURM_", "SBATCH_", "SRUN_", "SNAKEMAKE_"))]:
        env.pop(key)
    return env


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def sacct_state(job_id: str) -> str:
    out = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-j", str(job_id), "-o", "State"], capture_output=True, text=True
    ).stdout.split()
    return out[0] if out else ""


def _remote_plan_totals(config_path: str) -> dict:
    """Runs on a Slurm node: imports upcycling and plans the sweep there."""
    import socket

    from upcycling.cluster.plan import plan
    from upcycling.sweep.load import load_sweep

    totals = plan(load_sweep(config_path, check_corpus=False))["totals"]
    return {
        "host": socket.gethostname(),
        "job_id": os.environ.get("SLURM_JOB_ID"),
        "training_jobs": totals["training_jobs"],
        "expected_gpu_hours": totals["expected_gpu_hours"],
    }


@pytest.mark.slurm
def test_submitit_runs_a_function_on_slurm(slurm_cluster, tmp_path, monkeypatch):
    import cloudpickle
    import submitit

    # This test module is not importable on the node: send the function by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    for key, value in slurm_env().items():
        monkeypatch.setenv(key, value)
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    executor.update_parameters(timeout_min=5, cpus_per_task=1, mem_gb=1, name="upcycling-plan")
    job = executor.submit(_remote_plan_totals, str(PAPER))
    result = job.result()
    local = plan(_sweep())["totals"]
    assert result["job_id"] == job.job_id
    assert result["training_jobs"] == local["training_jobs"]
    assert result["expected_gpu_hours"] == pytest.approx(local["expected_gpu_hours"])
    wait_for(lambda: sacct_state(job.job_id) == "COMPLETED", 60, "sacct to report the job COMPLETED")


@pytest.mark.slurm
def test_submitit_training_requeues_and_resumes(slurm_cluster, tiny_workdir, tmp_path):
    """A training run submitted with submit_training gets the time-out warning while it trains: it
    checkpoints, requeues itself, and the requeued job resumes from the checkpoint and finishes."""
    config = write_config(
        tiny_workdir,
        {
            "training": {
                "schedule": "cosine",
                "checkpoint_every_tokens": 32768,
                "eval_every_tokens": 32768,
                "log_every_steps": 4,
            },
            "sweep": {"d1_tokens": [8192, 131072]},
            "slurm": {"gpus_per_job": 0, "signal_seconds_before_limit": 60},
        },
    )
    train_args = ["--family", "dense", "--size", "xs", "--budget", "131072"]
    job = launch.submit_training(
        config, train_args, tmp_path / "submitit", workdir=tiny_workdir, env=slurm_env(), cpus_per_task=1, mem_gb=3
    )
    # Wait until the trainer is past its first step, then announce the time limit (USR2).
    wait_for(lambda: " step " in _read(job.paths.stdout), 180, "the trainer's first steps", interval=0.2)
    job._interrupt(timeout=True)
    result = job.result()
    log = _read(job.paths.stdout) + _read(job.paths.stderr)
    assert result["returncode"] == 0 and result["restarts"] >= 1, log[-3000:]
    assert "resumed its own checkpoint" in log, log[-3000:]
    metrics = read_json(tiny_workdir / "results" / "dense" / "xs" / "seed0" / "d1_131072" / "metrics.json")
    assert metrics["tokens_seen"] == 131072 and math.isfinite(metrics["final_val_loss"])
    assert result["final_val_loss"] == metrics["final_val_loss"]


def _read(path) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


@pytest.mark.slurm
def test_srun_starts_one_rank_per_task(slurm_cluster, tiny_workdir):
    """`srun` with two tasks: each process maps Slurm's variables to RANK/WORLD_SIZE/... and the two
    train one model together (gloo on CPU)."""
    config = write_config(
        tiny_workdir, {"training": {"schedule": "cosine"}, "slurm": {"gpus_per_job": 2, "cpus_per_gpu": 1}}
    )
    srun = launcher(load_sweep(config, base_dir=tiny_workdir)).split()  # what the training rules put first
    assert srun[:3] == ["srun", "--nodes=1", "--ntasks-per-node=2"]
    command = [
        *srun,
        "--mem=3000",
        "--time=10",
        sys.executable,
        "-m",
        "upcycling.cli",
        "train",
        "--config",
        str(config),
        "--family",
        "dense",
        "--size",
        "xs",
        "--budget",
        "8192",
    ]
    result = subprocess.run(command, cwd=tiny_workdir, env=slurm_env(), capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "[rank 0]" in output and "[rank 1]" in output
    metrics = read_json(tiny_workdir / "results" / "dense" / "xs" / "seed0" / "d1_8192" / "metrics.json")
    assert metrics["tokens_seen"] == 8192 and math.isfinite(metrics["final_val_loss"])


# ----------------------------------------------------------------------------- snakemake --profile slurm


def _aggregate_available() -> bool:
    result = subprocess.run(
        [sys.executable, "-m", "upcycling.cli", "aggregate", "--help"],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    return result.returncode == 0


def _job_stats(output: str) -> dict[str, int]:
    """Snakemake's 'Job stats' table (the jobs it is about to run) as {rule: count}."""
    match = re.search(r"Job stats:\n(?:job\s+count\n[-\s]+\n)(.*?)\ntotal\s+\d+", output, re.S)
    if not match:
        return {}
    return {name: int(count) for name, count in re.findall(r"^(\S+)\s+(\d+)$", match.group(1), re.M)}


def _snakemake(workdir: Path, config: Path, targets: list[str], *extra: str, timeout: int = 420, wait=True):
    command = [
        sys.executable,
        "-m",
        "snakemake",
        "--snakefile",
        str(REPO / "Snakefile"),
        "--directory",
        str(workdir),
        "--configfile",
        str(config),
        "--profile",
        str(REPO / "profiles" / "slurm"),
        # Faster polling for seconds-long jobs (the profile's 40 s suit hours-long ones).
        "--slurm-init-seconds-before-status-checks",
        "1",
        "--seconds-between-status-checks",
        "2",
        "--latency-wait",
        "5",
        # Two jobs side by side on the 2-CPU node.
        "--set-resources",
        *[f"{rule}:mem_mb=2000" for rule in RULES],
        *extra,
        "--",
        *targets,
    ]
    process = subprocess.Popen(
        command, cwd=workdir, env=slurm_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    if not wait:
        return process
    output, _ = process.communicate(timeout=timeout)
    return process.returncode, output


CANCELLED_RULE = "upcycled_stable"
# The job to cancel: the long stable job (to D2's stable point 491520) of the D1=16384 upcycled
# chain. Its run at D2=655360 depends on it; the chain's run at D2=8192 does not.
CANCELLED = {"size": "xs", "seed": "0", "d1": "16384", "variant": "e4_k2_g1", "point": "491520"}
CANCELLED_RUN = "upcycled/xs/seed0/d1_16384/e4_k2_g1/stable_491520"
CANCELLED_POINT = 491520
DEPENDENT = {**{k: v for k, v in CANCELLED.items() if k != "point"}, "d2": "655360"}


def _newest_run_id(workdir: Path, ignore: set) -> str | None:
    """The plugin's run id (the name of every Slurm job of one snakemake run) from its new log."""
    logs = sorted(set((workdir / ".snakemake" / "log").glob("*.snakemake.log")) - ignore)
    match = re.search(r"SLURM run ID: (\S+)", _read(logs[-1])) if logs else None
    return match.group(1) if match else None


def _running_job(run_id: str, comment: re.Pattern) -> str | None:
    out = subprocess.run(["squeue", "-h", f"--name={run_id}", "-o", "%i|%T|%k"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        job_id, state, job_comment = (line.split("|", 2) + ["", ""])[:3]
        if state == "RUNNING" and comment.search(job_comment.strip()):
            return job_id
    return None


def _signal_when_training(workdir: Path, log: Path, ignore_logs: set, signal: str | None) -> tuple[str, str]:
    """Wait until the cancelled rule's job trains (its log shows steps), then scancel it (with
    --signal=SIGNAL when given). Returns the Slurm job id and the job's log at that moment."""
    run_id = wait_for(lambda: _newest_run_id(workdir, ignore_logs), 120, "snakemake's SLURM run ID")
    # The plugin puts rule and wildcards in the job's --comment.
    comment = re.compile(rf"rule_{CANCELLED_RULE}_wildcards_xs_0_16384_.*_{CANCELLED_POINT}$")

    def training():
        text = _read(log)
        if "done," in text:
            raise AssertionError(f"{log.name}: the job finished before it could be signalled")
        return " step " in text

    wait_for(training, 420, f"{log.name} to show training steps", interval=0.1)
    job_id = wait_for(lambda: _running_job(run_id, comment), 30, f"the {CANCELLED_RULE} job in squeue", interval=0.1)
    text = _read(log)
    subprocess.run(["scancel", *([f"--signal={signal}"] if signal else []), job_id], check=True)
    return job_id, text


@pytest.fixture(scope="module")
def sweep_under_slurm(slurm_cluster, tmp_path_factory):
    """The tiny sweep through `snakemake --profile profiles/slurm`, twice:

    1. everything, with no retries; the long upcycled stable job is cancelled with scancel while it
       trains (SIGTERM: the trainer checkpoints and exits 75), so it and its dependents stay undone;
    2. a plain rerun: the cancelled job resumes from its checkpoint, and its dependents run.
    """
    workdir = tmp_path_factory.mktemp("slurm_sweep")
    config = write_config(workdir, base=SLURM_TINY)
    inventory = Inventory(load_sweep(config, base_dir=workdir))
    cfg = inventory.sweep
    metrics = [job.outputs["metrics"] for job in inventory.jobs if "metrics" in job.outputs]
    targets = [inventory.find("aggregate", {}).outputs["store"]] if _aggregate_available() else metrics
    cancelled = inventory.find(CANCELLED_RULE, CANCELLED)
    job_log = Path(cancelled.log)
    checkpoint = Path(cancelled.spec["partial"])

    runs = []
    for index in range(2):
        if index == 1:
            runs[0]["before"] = {
                path: (Path(path).stat().st_mtime_ns, read_json(path)["final_val_loss"])
                for path in metrics
                if Path(path).is_file()
            }
            runs[0]["checkpoint_after"] = (checkpoint / "manifest.json").is_file()
        old_logs = set((workdir / ".snakemake" / "log").glob("*.snakemake.log"))
        started = time.monotonic()
        process = _snakemake(workdir, config, targets, "--retries", "0", wait=False)
        job_id, log_text = None, ""
        try:
            if index == 0:
                job_id, log_text = _signal_when_training(workdir, job_log, old_logs, None)
            output, _ = process.communicate(timeout=480)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
        runs.append(
            {
                "returncode": process.returncode,
                "output": output,
                "job_id": job_id,
                "log_at_signal": log_text,
                "log_after": _read(job_log),
                "attempts": _read(job_log.with_name(job_log.stem + ".attempts.log")),
                "seconds": time.monotonic() - started,
            }
        )
    wait_for(lambda: sacct_state(runs[0]["job_id"]) == "CANCELLED", 60, "sacct to report the cancellation")
    print(f"\nsnakemake --profile slurm: first run {runs[0]['seconds']:.0f} s, rerun {runs[1]['seconds']:.0f} s")
    return {
        "workdir": workdir,
        "cfg": cfg,
        "inventory": inventory,
        "metrics": metrics,
        "targets": targets,
        "first": runs[0],
        "second": runs[1],
        "before": runs[0]["before"],
    }


@pytest.mark.slurm
def test_snakemake_slurm_profile_end_to_end(sweep_under_slurm):
    run = sweep_under_slurm
    cfg = run["cfg"]
    first, second = run["first"], run["second"]
    # The first run did everything it could, and reported the cancelled job as failed.
    assert first["returncode"] != 0, first["output"][-3000:]
    assert "CANCELLED" in first["output"], first["output"][-3000:]
    assert "submitted with SLURM jobid" in first["output"]
    stats = _job_stats(first["output"])
    assert stats.get("upcycled_final") == 4 and stats.get("dense_stable") == 2, first["output"][:3000]
    # The rerun completed the sweep.
    assert second["returncode"] == 0, second["output"][-4000:]
    assert len(run["metrics"]) == len(cfg.sweep.d1_tokens) * (1 + len(cfg.sweep.d2_tokens))
    for path in run["metrics"]:
        metrics = read_json(path)
        assert math.isfinite(metrics["final_val_loss"]) and metrics["tokens_seen"] > 0
    for target in run["targets"]:
        assert Path(target).exists()


@pytest.mark.slurm
def test_scancel_then_rerun_redoes_only_that_job_and_its_dependents(sweep_under_slurm):
    run = sweep_under_slurm
    dependent_metrics = run["inventory"].find("upcycled_final", DEPENDENT).outputs["metrics"]
    # What the rerun ran: the cancelled job, the run that depends on it, and the aggregate if targeted.
    stats = _job_stats(run["second"]["output"])
    expected = {CANCELLED_RULE: 1, "upcycled_final": 1}
    if any(target.endswith("losses.zarr") for target in run["targets"]):
        expected["aggregate"] = 1
    assert stats == expected, run["second"]["output"][:4000]
    assert dependent_metrics not in run["before"]  # it could not run after the cancellation
    assert Path(dependent_metrics).is_file()
    # Every other run is untouched: same file, same loss.
    assert len(run["before"]) == len(run["metrics"]) - 1
    for path, (mtime_ns, loss) in run["before"].items():
        assert Path(path).stat().st_mtime_ns == mtime_ns, path
        assert read_json(path)["final_val_loss"] == loss, path


@pytest.mark.slurm
def test_scancel_checkpoints_and_the_rerun_resumes(sweep_under_slurm):
    """scancel (SIGTERM) mid-training: the trainer saves and exits 75 while Snakemake's job wrapper
    waits for it; the rerun resumes from that checkpoint; the attempts log keeps both attempts."""
    run = sweep_under_slurm
    first, second = run["first"], run["second"]
    assert first["checkpoint_after"], first["log_at_signal"][-2000:]
    attempts = second["attempts"]
    assert attempts.count(f"==== {CANCELLED_RUN}: attempt") == 2, attempts[-3000:]
    assert "SIGTERM received: checkpoint saved" in attempts, attempts[-3000:]
    assert "resumed its own checkpoint" in second["log_after"], second["log_after"][-2000:]
    assert "done," in second["log_after"]


@pytest.mark.slurm
def test_a_cpu_training_job_uses_its_allocation(sweep_under_slurm):
    """A CPU job asks slurm.cpu_threads CPUs and trains with as many threads: sacct's TotalCPU over
    Elapsed x AllocCPUS is at least 90% for the sweep's longest training job."""
    submitted = set(
        re.findall(
            r"submitted with SLURM jobid (\d+)",
            sweep_under_slurm["first"]["output"] + sweep_under_slurm["second"]["output"],
        )
    )
    job_id, elapsed, cpus = _longest_training_job(submitted)
    used = _total_cpu_seconds(job_id)
    print(f"\nCPU job {job_id}: {used:.1f} CPU-s over {elapsed:.1f} s x {cpus} CPUs = {used / (elapsed * cpus):.0%}")
    assert cpus == run_cpu_threads(sweep_under_slurm) and used / (elapsed * cpus) >= 0.9


def run_cpu_threads(run) -> int:
    return run["cfg"].slurm.cpu_threads


def _seconds(text: str) -> float:
    """sacct's [DD-[HH:]]MM:SS(.fff) as seconds."""
    days, _, clock = text.rpartition("-")
    parts = [float(value) for value in clock.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0.0)
    return (int(days) if days else 0) * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]


def _longest_training_job(job_ids: set[str]) -> tuple[str, float, int]:
    """(job id, elapsed seconds, allocated CPUs) of the longest completed training job among job_ids."""
    out = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-S", "now-1hour", "-o", "JobID,State,ElapsedRaw,AllocCPUS,Comment%200"],
        capture_output=True,
        text=True,
    ).stdout
    jobs = [line.split("|", 4) for line in out.splitlines() if line.count("|") >= 4]
    training = [
        (job_id, float(elapsed), int(cpus))
        for job_id, state, elapsed, cpus, comment in jobs
        if job_id in job_ids
        and state == "COMPLETED"
        and re.match(r"rule_(dense|upcycled)_(stable|final)_wildcards", comment)
    ]
    assert training, out[-3000:]
    return max(training, key=lambda job: job[1])


def _total_cpu_seconds(job_id: str) -> float:
    """The job's TotalCPU: the sum over its steps, which `sacct -X` (allocation only) leaves at 0."""
    line = subprocess.run(
        ["sacct", "-n", "-P", "-j", job_id, "-o", "JobID,TotalCPU"], capture_output=True, text=True
    ).stdout.splitlines()[0]
    return _seconds(line.split("|")[1])


@pytest.mark.slurm
def test_a_real_time_limit_checkpoints_and_the_retry_resumes(slurm_cluster, tmp_path):
    """A job whose time limit is shorter than its work, with a 20-second warning: Slurm sends USR1
    before the limit (or TERM at it); the trainer saves and exits 75; Snakemake's job wrapper
    survives it (the step is not cancelled); the profile's retries resume it until it is done,
    and its attempts log keeps every attempt."""
    config = write_config(
        tmp_path,
        {
            "training": {"schedule": "cosine", "checkpoint_every_tokens": 10**9, "log_every_steps": 16},
            "data": {"seq_len": 32, "max_epochs": 100},
            "sweep": {"d1_tokens": [TIME_LIMITED_TOKENS], "d2_tokens": [8192]},
            # A 1-minute limit: no throughput estimate (huge), no start-up allowance, a 20 s warning.
            "slurm": {
                "gpus_per_job": 0,
                "throughput_tokens_per_s": {"xs": 1e12},
                "startup_minutes": 0,
                "runtime_margin": 1.0,
                "signal_seconds_before_limit": 20,
            },
        },
        base=SLURM_TINY,
    )
    inventory = Inventory(load_sweep(config, base_dir=tmp_path))
    job = inventory.find("dense_final", {"size": "xs", "seed": "0", "d1": str(TIME_LIMITED_TOKENS)})
    assert job_resources(inventory.sweep, job)["runtime"] == 1
    returncode, output = _snakemake(tmp_path, config, [job.outputs["metrics"]], "--retries", "6", timeout=900)
    attempts = _read(Path(job.log).with_name(Path(job.log).stem + ".attempts.log"))
    assert returncode == 0, output[-4000:] + attempts[-3000:]
    headers = attempts.count("==== dense/xs/seed0/d1_")
    assert headers >= 2 and attempts.count("resumed its own checkpoint") == headers - 1, attempts[-4000:]
    assert re.search(r"SIG(USR1|TERM) received: checkpoint saved", attempts), attempts[-4000:]
    assert read_json(job.outputs["metrics"])["tokens_seen"] == TIME_LIMITED_TOKENS
    # The failed attempts ended by the trainer's exit, not by Slurm cancelling the step under it.
    states = subprocess.run(
        [
            "sacct",
            "-n",
            "-P",
            "-S",
            "now-1hour",
            "--name",
            re.search(r"SLURM run ID: (\S+)", output).group(1),
            "-o",
            "JobID,State",
        ],
        capture_output=True,
        text=True,
    ).stdout
    assert "CANCELLED" not in states and "COMPLETED" in states, states


TIME_LIMITED_TOKENS = 3_000_000  # minutes of training for xs on one CPU: several 1-minute attempts


@pytest.mark.slurm
def test_preflight_on_this_cluster_before_any_sbatch(slurm_cluster, tmp_path):
    """The default config runs on this CPU-only cluster as shipped; a config asking GPUs is refused,
    naming the key, by `plan --check` and by `snakemake --profile slurm` before anything is submitted."""
    result = subprocess.run(
        ["upcycling", "plan", "--check", "--config", str(REPO / "config" / "config.yaml")],
        cwd=REPO,
        env=slurm_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and "preflight: every job fits" in result.stdout, result.stderr[-2000:]
    config = write_config(tmp_path, {"slurm": {"gpus_per_job": 1}}, base=SLURM_TINY)
    result = subprocess.run(
        ["upcycling", "plan", "--check", "--config", str(config)],
        cwd=tmp_path,
        env=slurm_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "slurm.gpus_per_job: " in result.stderr, result.stderr[-2000:]
    returncode, output = _snakemake(tmp_path, config, [], timeout=300)
    assert returncode != 0 and "cannot run the sweep (nothing was submitted)" in output, output[-3000:]
    assert "set slurm.gpus_per_job: 0" in output and "submitted with SLURM jobid" not in output
