"""The admin's view of a sweep, from its config alone: jobs per rule, what each asks Slurm for,
and the GPU-hours the whole sweep costs (``upcycling plan --config config/paper.yaml``).

No tokens and no corpus are needed: the plan enumerates the same jobs as the Snakefile (via
``upcycling.sweep``: lineages, budgets, WSD stable points) and asks ``upcycling.resources`` for
each training job's resources, exactly as the rules do. Sizing before the tokenizer exists uses
``tokenizer.vocab_size``.

Two GPU-hour totals: *requested* (GPUs x runtime of every training job: what the sweep books on
the cluster, margin and start-up included) and *expected* (GPUs x tokens / throughput: the compute
itself, without margin, start-up or retries). A preempted or timed-out training job loses at most
``training.checkpoint_every_tokens`` tokens of work (the trainer saves that often, and on the USR1
warning), which the plan converts to minutes per model.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import yaml

from . import sweep
from .config import ConfigError, load_config
from .resources import compute_seconds, job_resources

TRAINING_RULES = ("dense_stable", "dense_final", "upcycled_stable", "upcycled_final", "scratch_stable",
                  "scratch_final")
RULE_ORDER = ("tokenize", "dense_stable", "dense_final", "upcycle", "upcycled_stable", "upcycled_final",
              "scratch_stable", "scratch_final", "aggregate", "fit", "report")
RESOURCE_KEYS = ("runtime", "mem_mb", "gpu", "cpus_per_task", "nodes")


# ----------------------------------------------------------------------------- config without corpus


def load_config_for_plan(path: str | os.PathLike, base_dir: str | os.PathLike | None = None) -> dict:
    """Every check of a real run except those that need the corpus on disk: a paper-scale sweep
    can be planned on a machine that does not hold its corpus."""
    return load_config(path, base_dir, check_corpus=False)


# ----------------------------------------------------------------------------- the jobs


def _unique(values):
    return list(dict.fromkeys(values))


def training_jobs(cfg: dict) -> list[dict]:
    """Every training job of the sweep: rule, wildcards, tokens, family, size."""
    wsd = cfg["training"]["schedule"] == "wsd"
    jobs = []
    for lineage in sweep.lineages(cfg):
        family = lineage.family
        base = {"size": lineage.size, "seed": lineage.seed, "experts": lineage.experts, "top_k": lineage.top_k,
                "granularity": lineage.granularity}
        if family == "upcycled":
            base["d1"] = lineage.d1
        budget_key = {"dense": "d1", "upcycled": "d2", "scratch": "d"}[family]
        if wsd:
            for point in _unique(sweep.stable_points(cfg, family)):
                jobs.append({"rule": f"{family}_stable", "family": family, "phase": "stable",
                             "lineage": lineage.name, "wildcards": {**base, "point": point}})
        for budget in sweep.budgets(cfg, family):
            wildcards = {**base, budget_key: budget}
            jobs.append({"rule": f"{family}_final", "family": family, "phase": "final",
                         "lineage": lineage.name, "wildcards": wildcards})
    return jobs


def plan(cfg: dict, default_resources: dict | None = None) -> dict:
    """Jobs per rule, each distinct job's resources, and the sweep's GPU-hours (see module doc).

    ``default_resources``: what the Snakemake profile gives the rules that compute none
    (tokenize, upcycle, aggregate, fit, report); shown as is.
    """
    slurm = cfg.get("slurm", {})
    gpus_per_job = slurm.get("gpus_per_job", 1)
    jobs = training_jobs(cfg)
    for job in jobs:
        resources = job_resources(cfg, job["family"], job["phase"], SimpleNamespace(**job["wildcards"]))
        job["resources"] = {key: value for key, value in resources.items() if key != "tokens"}
        job["tokens"] = resources["tokens"]
        job["expected_hours"] = compute_seconds(cfg, job["family"], job["wildcards"]["size"],
                                                  resources["tokens"]) / 3600
        job["requested_gpu_hours"] = gpus_per_job * resources["runtime"] / 60
        job["expected_gpu_hours"] = gpus_per_job * job["expected_hours"]

    counts = Counter(job["rule"] for job in jobs)
    moe_shapes = len(cfg["sweep"]["experts"]) * len(cfg["sweep"]["top_k"]) * len(cfg["sweep"]["granularity"])
    n_models = len(cfg["dense_models"]) * len(cfg["training"]["seeds"])
    counts["tokenize"] = 1
    counts["upcycle"] = n_models * len(cfg["sweep"]["d1_tokens"]) * moe_shapes
    counts.update({"aggregate": 1, "fit": 1, "report": 1})

    rules = {}
    sizes = list(cfg["dense_models"])
    defaults = dict(default_resources or {})
    for rule in RULE_ORDER:
        if not counts.get(rule):
            continue
        if rule in TRAINING_RULES:
            rule_jobs = [job for job in jobs if job["rule"] == rule]
            distinct: dict[tuple, dict] = {}
            for job in rule_jobs:
                size = job["wildcards"]["size"]
                key = (size, job["tokens"], *(job["resources"][k] for k in RESOURCE_KEYS))
                entry = distinct.setdefault(key, {**job["resources"], "size": size, "jobs": 0,
                                                  "tokens": job["tokens"],
                                                  "example": _job_label(rule, job["wildcards"])})
                entry["jobs"] += 1
            rules[rule] = {
                "jobs": counts[rule],
                "resources": sorted(distinct.values(), key=lambda r: (sizes.index(r["size"]), -r["tokens"])),
                "requested_gpu_hours": sum(job["requested_gpu_hours"] for job in rule_jobs),
                "expected_gpu_hours": sum(job["expected_gpu_hours"] for job in rule_jobs),
                "tokens": sum(job["tokens"] for job in rule_jobs),
                "source": "upcycling.resources (per job)",
            }
        else:
            rules[rule] = {"jobs": counts[rule], "resources": [dict(defaults, jobs=counts[rule])] if defaults else [],
                           "requested_gpu_hours": 0.0, "expected_gpu_hours": 0.0, "tokens": 0,
                           "source": "profile default-resources"}

    # What a preempted job costs: the work since its last checkpoint (at most checkpoint_every_tokens).
    ckpt = cfg["training"]["checkpoint_every_tokens"]
    preemption = {}
    for family in ("dense", "upcycled", "scratch"):
        if not any(job["family"] == family for job in jobs):
            continue
        for size in cfg["dense_models"]:
            seconds = compute_seconds(cfg, family, size, ckpt)
            preemption[f"{family}/{size}"] = {"minutes": seconds / 60,
                                              "gpu_hours": max(gpus_per_job, 0) * seconds / 3600}

    longest = max(jobs, key=lambda job: job["resources"]["runtime"]) if jobs else None
    totals = {
        "jobs": sum(counts.values()),
        "training_jobs": len(jobs),
        "tokens_trained": sum(job["tokens"] for job in jobs),
        "requested_gpu_hours": sum(job["requested_gpu_hours"] for job in jobs),
        "expected_gpu_hours": sum(job["expected_gpu_hours"] for job in jobs),
        "requested_job_hours": sum(job["resources"]["runtime"] for job in jobs) / 60,
        "expected_job_hours": sum(job["expected_hours"] for job in jobs),
        "longest_job": None if longest is None else {
            "job": _job_label(longest["rule"], longest["wildcards"]), "runtime": longest["resources"]["runtime"]},
        "max_mem_mb": max((job["resources"]["mem_mb"] for job in jobs), default=0),
        "runs": len(sweep.all_metrics(cfg)),
    }
    return {
        "gpus_per_job": gpus_per_job,
        "nodes": slurm.get("nodes", 1),
        "schedule": cfg["training"]["schedule"],
        "checkpoint_every_tokens": ckpt,
        "signal_seconds_before_limit": slurm.get("signal_seconds_before_limit", 300),
        "rules": rules,
        "totals": totals,
        "preemption_loss": preemption,
        "jobs": [{k: job[k] for k in ("rule", "wildcards", "tokens", "resources", "expected_hours")} for job in jobs],
    }


def _job_label(rule: str, wildcards: dict) -> str:
    return rule + "[" + ",".join(f"{k}={v}" for k, v in wildcards.items()) + "]"


# ----------------------------------------------------------------------------- text


def _tokens(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"


def _duration(minutes: float) -> str:
    if minutes >= 120:
        return f"{minutes / 60:.1f} h"
    return f"{minutes:.0f} min" if minutes >= 1 else f"{minutes * 60:.0f} s"


def format_plan(plan: dict) -> str:
    """The plan as a text report for the admin."""
    totals = plan["totals"]
    gpus = plan["gpus_per_job"]
    lines = [f"Sweep plan: {totals['runs']} runs, {totals['jobs']} jobs ({totals['training_jobs']} training jobs, "
             f"{plan['schedule']} schedule), {gpus} GPU(s) x {plan['nodes']} node(s) per training job",
             ""]
    header = (f"{'rule':<16} {'jobs':>5}  {'size':<8} {'tokens/job':>10} {'x jobs':>6}  {'runtime':>9} {'mem':>9} "
              f"{'GPUs':>4} {'CPUs':>4} {'nodes':>5}")
    lines += [header, "-" * len(header)]
    for rule, info in plan["rules"].items():
        resources = info["resources"]
        if not resources:
            lines.append(f"{rule:<16} {info['jobs']:>5}  (the profile's default-resources)")
            continue
        for index, res in enumerate(resources):
            name, count = (rule, f"{info['jobs']:>5}") if index == 0 else ("", "     ")
            runtime = _duration(float(res["runtime"])) if "runtime" in res else "default"
            mem = f"{float(res['mem_mb']) / 1024:.1f} GB" if "mem_mb" in res else "default"
            tokens = _tokens(res["tokens"]) if res.get("tokens") else "-"
            lines.append(f"{name:<16} {count}  {res.get('size', '-'):<8} {tokens:>10} {res['jobs']:>6}  {runtime:>9} "
                         f"{mem:>9} {res.get('gpu', 0):>4} {res.get('cpus_per_task', '-'):>4} {res.get('nodes', 1):>5}")
    lines += ["",
              f"Tokens trained: {_tokens(totals['tokens_trained'])} over all training jobs",
              f"GPU-hours requested (GPUs x runtime, margin and start-up included): {totals['requested_gpu_hours']:,.1f}",
              f"GPU-hours expected (GPUs x tokens / throughput, no margin):          {totals['expected_gpu_hours']:,.1f}"]
    if gpus == 0:
        lines.append(f"(CPU-only config: job-hours requested {totals['requested_job_hours']:,.1f}, "
                     f"expected {totals['expected_job_hours']:,.2f})")
    if totals["longest_job"]:
        lines.append(f"Longest job: {_duration(totals['longest_job']['runtime'])} ({totals['longest_job']['job']}); "
                     f"largest memory request {totals['max_mem_mb'] / 1024:.1f} GB")
    lines += ["",
              f"Preemption: training jobs checkpoint every {_tokens(plan['checkpoint_every_tokens'])} tokens and on the "
              f"USR1 warning {plan['signal_seconds_before_limit']} s before their limit; a preempted job loses at most:"]
    for name, loss in plan["preemption_loss"].items():
        lines.append(f"  {name:<24} {_duration(loss['minutes']):>9}  ({loss['gpu_hours']:.2f} GPU-hours)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI (`upcycling plan`)


def profile_default_resources(profile: str | os.PathLike | None) -> dict:
    """``default-resources`` of a Snakemake profile directory (or config file); {} if none."""
    if not profile:
        return {}
    path = Path(profile)
    if path.is_dir():
        path = next((path / name for name in ("profile.yaml", "config.yaml") if (path / name).is_file()), path)
    if not path.is_file():
        return {}
    data = yaml.safe_load(path.read_text()) or {}
    defaults = data.get("default-resources") or {}
    if isinstance(defaults, list):  # ["mem_mb=1000", ...]
        defaults = dict(item.split("=", 1) for item in defaults)
    return {key: value for key, value in defaults.items() if key in RESOURCE_KEYS or key.startswith("slurm_")}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="config/config.yaml", help="sweep config YAML (no corpus needed)")
    parser.add_argument("--workdir", default=".", help="directory that relative paths in the config start from")
    parser.add_argument("--profile", default=str(Path(__file__).resolve().parents[2] / "profiles" / "slurm"),
                        help="Snakemake profile whose default-resources the non-training rules get")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON (every job included)")


def run(args: argparse.Namespace) -> int:
    cfg = load_config_for_plan(args.config, base_dir=args.workdir)
    result = plan(cfg, profile_default_resources(args.profile))
    if args.json:
        print(json.dumps(result, indent=1, default=str))
    else:
        print(format_plan(result))
    for key in ("requested_gpu_hours", "expected_gpu_hours"):
        if not math.isfinite(result["totals"][key]):
            raise ConfigError(f"the plan's {key} is not finite: check slurm.throughput_tokens_per_s")
    return 0
