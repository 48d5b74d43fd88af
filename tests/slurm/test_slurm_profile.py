"""``snakemake --profile profiles/slurm`` against the local Slurm cluster: the tiny sweep end to end,
one training job cancelled with scancel while it runs (the rerun redoes only it and what depends on
it), a CPU job's use of its allocation, a real time limit, and preflight before any sbatch."""

from __future__ import annotations

import math
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import faults
from slurm.test_slurm import _read, sacct_state, slurm_env, wait_for
from tiny_sweep import REPO, cli_env, read_json, write_config
from unit.test_cluster import SLURM_TINY
from upcycling.cluster.resources import job_resources
from upcycling.pipeline.jobs import RULES, Inventory
from upcycling.sweep.load import load_sweep

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


def _snakemake(
    workdir: Path, config: Path, targets: list[str], *extra: str, timeout: int = 420, wait=True, env: dict | None = None
):
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
        command, cwd=workdir, env=slurm_env(**(env or {})), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
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


def dense_final_sweep(make_workdir, tmp_path: Path, d1_tokens: int, slurm: dict | None = None):
    """A sweep of one dense run (one job: a cosine schedule) in tmp_path, with the session's tokens in
    place (the sweep below runs the tokens rules), and these slurm settings: (its config, its
    inventory, the run's job)."""
    make_workdir(
        tmp_path,
        {
            "training": {"schedule": "cosine", "checkpoint_every_tokens": 10**9, "log_every_steps": 16},
            "data": {"seq_len": 32, "max_epochs": 100},
            "sweep": {"d1_tokens": [d1_tokens], "d2_tokens": [8192]},
            "slurm": {"gpus_per_job": 0, **(slurm or {})},
        },
        base=SLURM_TINY,
    )
    config = tmp_path / "config.yaml"
    inventory = Inventory(load_sweep(config, base_dir=tmp_path))
    return config, inventory, inventory.find("dense_final", {"size": "xs", "seed": "0", "d1": str(d1_tokens)})


@pytest.fixture(scope="module")
def sweep_under_slurm(slurm_cluster, tmp_path_factory):
    """The tiny sweep through `snakemake --profile profiles/slurm`, twice:

    1. everything, with no retries; the long upcycled stable job is cancelled with scancel while it
       trains (SIGTERM: the trainer checkpoints and exits 75), so it and its dependents stay undone;
    2. a plain rerun: the cancelled job resumes from its checkpoint, and its dependents run.
    """
    workdir = tmp_path_factory.mktemp("slurm_sweep")
    # One D1 (the cancelled chain's): the chain's run at D2=8192 is the finished work the rerun must
    # leave alone, and every rule still runs.
    config = write_config(workdir, {"sweep": {"d1_tokens": [16384]}}, base=SLURM_TINY)
    inventory = Inventory(load_sweep(config, base_dir=workdir))
    cfg = inventory.sweep
    metrics = [job.outputs["metrics"] for job in inventory.jobs if "metrics" in job.outputs]
    targets = [inventory.find("aggregate", {}).outputs["store"]] if _aggregate_available() else metrics
    cancelled = inventory.find(CANCELLED_RULE, CANCELLED)
    job_log = Path(cancelled.log)
    checkpoint = cfg.results_dir / cancelled.train_spec.partial  # a spec's paths start at the results directory

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
    axes = cfg.sweep
    assert stats.get("upcycled_final") == len(axes.d1_tokens) * len(axes.d2_tokens), first["output"][:3000]
    assert stats.get("dense_stable") == len(axes.d1_tokens), first["output"][:3000]
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


CPU_MEASURED_TOKENS = 800_000  # ~35 s of training: the few seconds of launch and start-up weigh little


@pytest.mark.alone  # other lanes' work beside it would take CPU time from the job it measures
def test_a_cpu_training_job_uses_its_allocation(slurm_cluster, make_workdir, tmp_path):
    """A CPU job asks slurm.cpu_threads CPUs and trains with as many threads: sacct's TotalCPU over
    Elapsed x AllocCPUS is at least 90% for a training job of about 35 s."""
    config, inventory, job = dense_final_sweep(make_workdir, tmp_path, CPU_MEASURED_TOKENS)
    returncode, output = _snakemake(tmp_path, config, [job.outputs["metrics"]], "--retries", "0")
    assert returncode == 0, output[-4000:]
    (job_id,) = re.findall(r"submitted with SLURM jobid (\d+)", output)
    elapsed, cpus, used = wait_for(lambda: _cpu_use(job_id), 60, f"sacct to account job {job_id}")
    print(f"\nCPU job {job_id}: {used:.1f} CPU-s over {elapsed:.1f} s x {cpus} CPUs = {used / (elapsed * cpus):.0%}")
    assert cpus == inventory.sweep.slurm.cpu_threads and used / (elapsed * cpus) >= 0.9


def _cpu_use(job_id: str) -> tuple[float, int, float] | None:
    """(elapsed seconds, allocated CPUs, TotalCPU seconds) of a completed job, once sacct has them.
    The job's own line sums TotalCPU over its steps (`sacct -X`, the allocation only, leaves it at 0)."""
    lines = subprocess.run(
        ["sacct", "-n", "-P", "-j", job_id, "-o", "State,ElapsedRaw,AllocCPUS,TotalCPU"], capture_output=True, text=True
    ).stdout.splitlines()
    state, elapsed, cpus, total = (lines[0].split("|") + [""] * 4)[:4] if lines else ("",) * 4
    used = _seconds(total) if total else 0.0
    if state != "COMPLETED" or used == 0:
        return None
    return float(elapsed), int(cpus), used


def _seconds(text: str) -> float:
    """sacct's [DD-[HH:]]MM:SS(.fff) as seconds."""
    days, _, clock = text.rpartition("-")
    parts = [float(value) for value in clock.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0.0)
    return (int(days) if days else 0) * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]


@pytest.mark.slurm
def test_a_real_time_limit_checkpoints_and_the_retry_resumes(slurm_cluster, make_workdir, tmp_path):
    """A job whose first attempt cannot finish in its time limit (a fault hook slows it down, as a
    slow node would), with a 20-second warning: Slurm sends USR1 before the limit (or TERM at it); the
    trainer saves and exits 75; Snakemake's job wrapper survives it (the step is not cancelled); the
    profile's retries resume it until it is done, and its attempts log keeps every attempt."""
    # A 1-minute limit: no throughput estimate (huge), no start-up allowance, a 20 s warning.
    slurm = {
        "throughput_tokens_per_s": {"xs": 1e12},
        "startup_minutes": 0,
        "runtime_margin": 1.0,
        "signal_seconds_before_limit": 20,
    }
    config, inventory, job = dense_final_sweep(make_workdir, tmp_path, TIME_LIMITED_TOKENS, slurm)
    assert job_resources(inventory.sweep, job)["runtime"] == 1
    slow = faults.slow_first_attempt_env(tmp_path / "first-attempt")
    returncode, output = _snakemake(
        tmp_path, config, [job.outputs["metrics"]], "--retries", "12", timeout=600, env=slow
    )
    attempts = _read(Path(job.log).with_name(Path(job.log).stem + ".attempts.log"))
    assert returncode == 0, output[-4000:] + attempts[-3000:]
    headers = attempts.count("==== dense/xs/seed0/d1_")
    assert headers >= 2 and attempts.count("resumed its own checkpoint") == headers - 1, attempts[-4000:]
    assert re.search(r"SIG(USR1|TERM) received: checkpoint saved", attempts), attempts[-4000:]
    assert read_json(job.outputs["metrics"])["tokens_seen"] == TIME_LIMITED_TOKENS
    # The failed attempts ended by the trainer's exit, not by Slurm cancelling the step under it. An
    # attempt whose warning came during start-up (ignored: the trainer had no handlers yet) saves on
    # the TERM at the limit instead; Slurm then records the job TIMEOUT and its batch shell, which
    # does not ignore TERM, CANCELLED, while the step that ran the trainer still ends by its exit.
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
    job_states = dict(line.split("|", 1) for line in states.splitlines() if line)
    steps = {job_id: state for job_id, state in job_states.items() if re.fullmatch(r"\d+\.\d+", job_id)}
    attempts_states = [state for job_id, state in job_states.items() if job_id.isdigit()]
    assert steps and not any(state.startswith("CANCELLED") for state in steps.values()), states
    assert set(attempts_states[:-1]) <= {"FAILED", "TIMEOUT"} and attempts_states[-1] == "COMPLETED", states


# The slow first attempt trains 256 tokens per 0.2 s: it would need over 2 minutes for these, so its
# 1-minute limit stops it (Slurm checks limits periodically: the warning comes during start-up, where
# the TERM at the limit stands in for it, or up to 40 s into an attempt); the next attempt trains the
# rest at ~20k tokens/s in seconds.
TIME_LIMITED_TOKENS = 200_000


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
