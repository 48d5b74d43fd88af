"""What each job asks the scheduler for, computed from the work it does (pure functions).

A training job's runtime is its tokens over the configured throughput of its model size (one GPU,
measured with benchmarks/bench_train.py; MoE runs are slower by ``moe_throughput_factor``), times
a safety margin, plus start-up; memory grows with the parameter count. Resource names are those of
snakemake-executor-plugin-slurm (``runtime`` in minutes, ``mem_mb``, ``gpu``, ``cpus_per_task``,
``slurm_extra``, ``slurm_partition``, ``slurm_account``); ``--set-resources`` overrides any of them.
"""

from __future__ import annotations

import math
import os

from . import sweep
from .flops import ModelConfig, count_params

# Adam in fp32: weights, gradients and two moments (16 bytes/param), twice over while a checkpoint
# is serialised, plus the Python/DeepSpeed/CUDA runtime.
BYTES_PER_PARAM_HOST = 32
BASE_MEM_MB = 3000
# Vocabulary used for sizing before the tokenizer exists (the real one is known at run time).
DEFAULT_VOCAB = 32768


def _model(cfg: dict, size: str, experts: int, top_k: int, granularity: int) -> ModelConfig:
    from .model import model_config_from

    vocab = cfg["tokenizer"].get("vocab_size") or DEFAULT_VOCAB
    return model_config_from(cfg, size, vocab, experts, top_k, granularity)


def job_tokens(cfg: dict, family: str, phase: str, budget_or_point: int) -> int:
    """Tokens a job trains: a stable job the gap from the previous stable point, a final job its decay
    (WSD) or its whole budget (cosine)."""
    if phase == "stable":
        previous = sweep.previous_stable_point(cfg, family, budget_or_point) or 0
        return budget_or_point - previous
    if cfg["training"]["schedule"] == "wsd":
        return budget_or_point - sweep.decay_start(cfg, budget_or_point)
    return budget_or_point


def training_resources(cfg: dict, family: str, phase: str, size: str, tokens: int, experts: int = 1,
                       top_k: int = 1, granularity: int = 1) -> dict:
    slurm = cfg.get("slurm", {})
    gpus = slurm.get("gpus_per_job", 1)
    throughput = slurm.get("throughput_tokens_per_s", {}).get(size, 100_000) * max(gpus, 1)
    if family != "dense":
        throughput *= slurm.get("moe_throughput_factor", 0.6)
    seconds = tokens / throughput * slurm.get("runtime_margin", 1.5)
    runtime = math.ceil(seconds / 60 + slurm.get("startup_minutes", 5))
    params = count_params(_model(cfg, size, experts if family != "dense" else 1, top_k, granularity)).total
    mem_mb = BASE_MEM_MB + math.ceil(params * BYTES_PER_PARAM_HOST / 1e6)
    warn = slurm.get("signal_seconds_before_limit", 300)
    # USR1 to every process of the job `warn` seconds before the limit: the trainer checkpoints
    # and exits 75, and the retried job resumes. Without B: the signal reaches the job steps too.
    extra = f"--signal=USR1@{warn}"
    return {"runtime": runtime, "mem_mb": mem_mb, "gpu": gpus, "cpus_per_task": max(2, 4 * gpus),
            "nodes": slurm.get("nodes", 1), "slurm_extra": extra, "tokens": tokens}


def job_resources(cfg: dict, family: str, phase: str, wildcards) -> dict:
    """Resources of a training rule's job, from its wildcards (Snakemake calls this)."""
    budget_key = {"dense": "d1", "upcycled": "d2", "scratch": "d"}[family]
    budget_or_point = int(wildcards.point if phase == "stable" else getattr(wildcards, budget_key))
    tokens = job_tokens(cfg, family, phase, budget_or_point)
    experts = int(getattr(wildcards, "experts", 1))
    top_k = int(getattr(wildcards, "top_k", 1))
    granularity = int(getattr(wildcards, "granularity", 1))
    resources = training_resources(cfg, family, phase, wildcards.size, tokens, experts, top_k, granularity)
    return {**resources, **scheduler_placement(cfg)}


def scheduler_placement(cfg: dict) -> dict:
    slurm = cfg.get("slurm", {})
    placement = {}
    if slurm.get("partition"):
        placement["slurm_partition"] = slurm["partition"]
    account = slurm.get("account") or os.environ.get("SLURM_ACCOUNT")
    if account:
        placement["slurm_account"] = account
    return placement
