"""The admin's view of a sweep, from its config alone: jobs per rule, what each asks Slurm for,
the GPU-hours and the disk the sweep costs (``upcycling plan --config config/paper.yaml``).

No tokens and no corpus are needed. The jobs are the job inventory's (:mod:`upcycling.pipeline.jobs`, the
same list the Snakefile's rules are built from) and their resources are
:mod:`upcycling.cluster.resources`', exactly as the rules ask for them.

Two GPU-hour totals: *requested* (GPUs x runtime of every training job: what the sweep books on
the cluster, margin and start-up included) and *expected* (GPUs x tokens / throughput: the compute
itself, without margin, start-up or retries). A preempted or timed-out training job loses at most
``training.checkpoint_every_tokens`` tokens of work, which the plan converts to minutes per model.

Disk: every DeepSpeed checkpoint's size (weights, fp32 master weights and Adam moments), the time
to write it at ``resources.CHECKPOINT_WRITE_BYTES_PER_S`` (it must fit in the warning signal's
lead), what each rule leaves on disk, and the sweep's peak: lasting outputs (exports) plus every
stable checkpoint that exists at once in the worst case (all chains advanced, no consumer done),
plus the checkpoints of the training jobs running at once.
"""

from __future__ import annotations

import argparse
import json
import math

from upcycling.cluster.resources import (
    CHECKPOINT_WRITE_BYTES_PER_S,
    checkpoint_bytes,
    compute_seconds,
    job_resources,
    output_bytes,
    training_seconds,
)
from upcycling.pipeline.jobs import RULES, Inventory, Job
from upcycling.sweep.load import ConfigError, load_sweep
from upcycling.sweep.settings import Sweep

RESOURCE_KEYS = ("runtime", "mem_mb", "gpu", "cpus_per_task", "nodes")


def _job_entry(sweep: Sweep, job: Job) -> dict:
    resources = job_resources(sweep, job)
    entry = {
        "rule": job.rule,
        "label": job.label,
        "wildcards": dict(job.wildcards),
        "tokens": job.tokens,
        "resources": {key: resources[key] for key in RESOURCE_KEYS if key in resources},
        "checkpoint_bytes": checkpoint_bytes(sweep, job),
        "output_bytes": output_bytes(sweep, job),
    }
    gpus = sweep.slurm.gpus_per_job
    if job.phase is not None:
        hours = training_seconds(sweep, job) / 3600
        entry.update(
            expected_hours=hours, expected_gpu_hours=gpus * hours, requested_gpu_hours=gpus * resources["runtime"] / 60
        )
    return entry


def plan(sweep: Sweep, concurrent_jobs: int = 100, base_dir=None, inventory: Inventory | None = None) -> dict:
    """Jobs per rule, each distinct job's resources, the sweep's GPU-hours and disk (see module doc).

    ``concurrent_jobs``: training jobs running at once (the Slurm profile's ``jobs``), for the peak
    disk of in-flight checkpoints. ``inventory``: the sweep's, if already built (else built here)."""
    if inventory is None:
        inventory = Inventory(sweep, base_dir)
    entries = [_job_entry(sweep, job) for job in inventory.jobs]
    training = [entry for entry in entries if "expected_hours" in entry]
    sizes = list(sweep.dense_models)

    rules = {}
    for rule in RULES:
        rule_entries = [entry for entry in entries if entry["rule"] == rule]
        if not rule_entries:
            continue
        distinct: dict[tuple, dict] = {}
        for entry in rule_entries:
            size = entry["wildcards"].get("size", "-")
            key = (size, entry["tokens"], *(entry["resources"].get(k) for k in RESOURCE_KEYS))
            row = distinct.setdefault(
                key,
                {
                    **entry["resources"],
                    "size": size,
                    "jobs": 0,
                    "tokens": entry["tokens"],
                    "checkpoint_bytes": entry["checkpoint_bytes"],
                    "example": entry["label"],
                },
            )
            row["jobs"] += 1
        rules[rule] = {
            "jobs": len(rule_entries),
            "resources": sorted(
                distinct.values(), key=lambda r: (sizes.index(r["size"]) if r["size"] in sizes else -1, -r["tokens"])
            ),
            "requested_gpu_hours": sum(e.get("requested_gpu_hours", 0.0) for e in rule_entries),
            "expected_gpu_hours": sum(e.get("expected_gpu_hours", 0.0) for e in rule_entries),
            "tokens": sum(e["tokens"] for e in rule_entries),
            "output_bytes": sum(e["output_bytes"] for e in rule_entries),
            "largest_checkpoint_bytes": max(e["checkpoint_bytes"] for e in rule_entries),
        }

    # What a preempted job costs: the work since its last checkpoint (at most checkpoint_every_tokens).
    ckpt = sweep.training.checkpoint_every_tokens
    preemption = {}
    for family in ("dense", "upcycled", "scratch"):
        if any(job.lineage is not None and job.lineage.family == family for job in inventory.jobs):
            for size in sizes:
                seconds = compute_seconds(sweep, family, size, ckpt)
                preemption[f"{family}/{size}"] = {
                    "minutes": seconds / 60,
                    "gpu_hours": sweep.slurm.gpus_per_job * seconds / 3600,
                }

    lasting = sum(e["output_bytes"] for e in entries if e["rule"] in ("dense_final", "transform"))
    stable = sum(e["output_bytes"] for e in entries if e["rule"].endswith("_stable"))
    in_flight = sum(sorted((e["checkpoint_bytes"] for e in training), reverse=True)[:concurrent_jobs])
    longest = max(training, key=lambda e: e["resources"]["runtime"]) if training else None
    largest = max(training, key=lambda e: e["checkpoint_bytes"]) if training else None
    totals = {
        "jobs": len(entries),
        "training_jobs": len(training),
        "tokens_trained": sum(e["tokens"] for e in training),
        "requested_gpu_hours": sum(e["requested_gpu_hours"] for e in training),
        "expected_gpu_hours": sum(e["expected_gpu_hours"] for e in training),
        "requested_job_hours": sum(e["resources"]["runtime"] for e in training) / 60,
        "expected_job_hours": sum(e["expected_hours"] for e in training),
        "longest_job": None
        if longest is None
        else {"job": longest["label"], "runtime": longest["resources"]["runtime"]},
        "max_mem_mb": max((e["resources"]["mem_mb"] for e in training), default=0),
        "runs": len(
            inventory.of_rule("dense_final") + inventory.of_rule("upcycled_final") + inventory.of_rule("scratch_final")
        ),
        "largest_checkpoint": None
        if largest is None
        else {
            "job": largest["label"],
            "bytes": largest["checkpoint_bytes"],
            "save_seconds": largest["checkpoint_bytes"] / CHECKPOINT_WRITE_BYTES_PER_S,
        },
        "disk_lasting_bytes": lasting,
        "disk_peak_bytes": lasting + stable + in_flight,
    }
    return {
        "gpus_per_job": sweep.slurm.gpus_per_job,
        "nodes": sweep.slurm.nodes,
        "schedule": sweep.training.schedule,
        "checkpoint_every_tokens": ckpt,
        "signal_seconds_before_limit": sweep.slurm.signal_seconds_before_limit,
        "keep_stable_checkpoints": sweep.training.keep_stable_checkpoints,
        "rules": rules,
        "totals": totals,
        "preemption_loss": preemption,
        "jobs": entries,
    }


# ----------------------------------------------------------------------------- text


def _tokens(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"


def _bytes(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def _duration(minutes: float) -> str:
    if minutes >= 120:
        return f"{minutes / 60:.1f} h"
    return f"{minutes:.0f} min" if minutes >= 1 else f"{minutes * 60:.0f} s"


def format_plan(result: dict) -> str:
    """The plan as a text report for the admin."""
    totals, gpus = result["totals"], result["gpus_per_job"]
    lines = [
        f"Sweep plan: {totals['runs']} runs, {totals['jobs']} jobs ({totals['training_jobs']} training jobs, "
        f"{result['schedule']} schedule), {gpus} GPU(s) x {result['nodes']} node(s) per training job",
        "",
    ]
    header = (
        f"{'rule':<16} {'jobs':>5}  {'size':<8} {'tokens/job':>10} {'x jobs':>6}  {'runtime':>9} {'mem':>9} "
        f"{'GPUs':>4} {'CPUs':>4} {'nodes':>5} {'checkpoint':>10} {'save':>7}"
    )
    lines += [header, "-" * len(header)]
    for rule, info in result["rules"].items():
        for index, res in enumerate(info["resources"]):
            name, count = (rule, f"{info['jobs']:>5}") if index == 0 else ("", "     ")
            tokens = _tokens(res["tokens"]) if res.get("tokens") else "-"
            checkpoint = _bytes(res["checkpoint_bytes"]) if res["checkpoint_bytes"] else "-"
            save = (
                _duration(res["checkpoint_bytes"] / CHECKPOINT_WRITE_BYTES_PER_S / 60)
                if res["checkpoint_bytes"]
                else "-"
            )
            lines.append(
                f"{name:<16} {count}  {res['size']:<8} {tokens:>10} {res['jobs']:>6}  "
                f"{_duration(float(res['runtime'])):>9} {float(res['mem_mb']) / 1024:>6.1f} GB "
                f"{res.get('gpu', 0):>4} {res.get('cpus_per_task', '-'):>4} {res.get('nodes', 1):>5} "
                f"{checkpoint:>10} {save:>7}"
            )
    lines += [
        "",
        f"Tokens trained: {_tokens(totals['tokens_trained'])} over all training jobs",
        f"GPU-hours requested (GPUs x runtime, margin and start-up included): {totals['requested_gpu_hours']:,.1f}",
        f"GPU-hours expected (GPUs x tokens / throughput, no margin):          {totals['expected_gpu_hours']:,.1f}",
    ]
    if gpus == 0:
        lines.append(
            f"(CPU-only config: job-hours requested {totals['requested_job_hours']:,.1f}, "
            f"expected {totals['expected_job_hours']:,.2f})"
        )
    if totals["longest_job"]:
        lines.append(
            f"Longest job: {_duration(totals['longest_job']['runtime'])} ({totals['longest_job']['job']}); "
            f"largest memory request {totals['max_mem_mb'] / 1024:.1f} GB"
        )
    if totals["largest_checkpoint"]:
        largest = totals["largest_checkpoint"]
        lines.append(
            f"Largest checkpoint: {_bytes(largest['bytes'])} ({largest['job']}), about "
            f"{_duration(largest['save_seconds'] / 60)} to save at "
            f"{_bytes(CHECKPOINT_WRITE_BYTES_PER_S)}/s; the warning signal comes "
            f"{result['signal_seconds_before_limit']} s before the limit"
        )
    stable_note = (
        "kept (training.keep_stable_checkpoints)"
        if result["keep_stable_checkpoints"]
        else "deleted once every job that reads them is done"
    )
    lines += [
        f"Disk: exports {_bytes(totals['disk_lasting_bytes'])} stay; stable checkpoints are {stable_note}; "
        f"peak at most {_bytes(totals['disk_peak_bytes'])} (every stable checkpoint at once, plus those of "
        "the jobs in flight). Final jobs delete their checkpoints (training.keep_final_checkpoints).",
        "",
        f"Preemption: training jobs checkpoint every {_tokens(result['checkpoint_every_tokens'])} tokens and on "
        f"the USR1 warning {result['signal_seconds_before_limit']} s before their limit; a preempted job loses "
        "at most:",
    ]
    for name, loss in result["preemption_loss"].items():
        lines.append(f"  {name:<24} {_duration(loss['minutes']):>9}  ({loss['gpu_hours']:.2f} GPU-hours)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI (`upcycling plan`)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="config/config.yaml", help="sweep config YAML (no corpus needed)")
    parser.add_argument("--workdir", default=".", help="directory that relative paths in the config start from")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON (every job included)")
    parser.add_argument(
        "--check",
        action="store_true",
        help="ask this Slurm cluster (sinfo, scontrol) whether it can run every job; refuse if not",
    )


def run(args: argparse.Namespace) -> int:
    sweep = load_sweep(args.config, base_dir=args.workdir, check_corpus=False)
    inventory = Inventory(sweep, args.workdir)
    result = plan(sweep, inventory=inventory)
    print(json.dumps(result, indent=1, default=str) if args.json else format_plan(result))
    if args.check:
        from upcycling.cluster.preflight import problems, read_cluster

        cluster = read_cluster()
        if cluster is None:
            raise ConfigError("plan --check: no Slurm cluster answers here (sinfo): run it where sbatch works")
        found = problems(inventory, cluster)
        for note in cluster.notes:
            print(f"preflight: {note}")
        if found:
            raise ConfigError("this Slurm cluster cannot run the sweep:\n- " + "\n- ".join(found))
        print(f"preflight: every job fits partition(s) {', '.join(sorted(cluster.partitions))} of this cluster")
    for key in ("requested_gpu_hours", "expected_gpu_hours"):
        if not math.isfinite(result["totals"][key]):
            raise ConfigError(f"the plan's {key} is not finite: check slurm.throughput_tokens_per_s")
    return 0
