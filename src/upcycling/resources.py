"""What each job asks the scheduler for, computed from the work it does (pure functions).

A training job's runtime is its tokens over the configured throughput of its model size (one GPU,
measured with benchmarks/bench_train.py; MoE runs are slower by ``moe_throughput_factor``), times
a safety margin, plus start-up and the lead of the warning signal; memory grows with the
parameter count and the processes per node. Resource names are those of
snakemake-executor-plugin-slurm (``runtime`` in minutes, ``mem_mb``, ``gpu``, ``cpus_per_task``,
``slurm_extra``, ``slurm_partition``, ``slurm_account``); ``--set-resources`` overrides any of them.
"""

from __future__ import annotations

import math
import os

from . import sweep
from .flops import ModelConfig, count_params

# Host memory of one training process. Without a GPU it holds the whole training state: Adam in
# fp32 is weights, gradients and two moments (16 bytes/param), twice over while a checkpoint is
# serialised. With a GPU the state lives there; the host holds the CUDA/NCCL/Python runtime per
# process and, on rank 0, the fp32 export of the weights and Adam moments (12 bytes/param).
CPU_BYTES_PER_PARAM = 32
GPU_EXPORT_BYTES_PER_PARAM = 12
CPU_BASE_MEM_MB = 3000
GPU_BASE_MEM_MB = 6000
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


def processes(cfg: dict) -> tuple[int, int]:
    """(training processes per node, nodes) of every training job: one process per GPU."""
    slurm = cfg.get("slurm", {})
    nodes = slurm.get("nodes", 1)
    return max(slurm.get("gpus_per_job", 1) // nodes, 1), nodes


def cpus_per_process(cfg: dict) -> int:
    slurm = cfg.get("slurm", {})
    return slurm.get("cpus_per_gpu", 4) if slurm.get("gpus_per_job", 1) else 2


def launch_resources(cfg: dict) -> dict:
    """The same for every training job: how the plugin starts its processes and places its GPUs.

    With several processes the rule's command starts them itself with ``srun``
    (:func:`upcycling.launch.srun_prefix`), so the plugin must run that command in the batch
    script (``mpi``) with the task count set, instead of inside a one-task step of its own that
    would hold the allocation. GPUs: ``--gpus=N`` for one node; ``--gres=gpu:n`` per node for
    several (``--gpus`` may spread unevenly over nodes)."""
    slurm = cfg.get("slurm", {})
    gpus = slurm.get("gpus_per_job", 1)
    per_node, nodes = processes(cfg)
    resources = {"nodes": nodes, "gpu": gpus if nodes == 1 else 0}
    if nodes > 1 and gpus:
        resources["gres"] = f"gpu:{per_node}"
    if per_node > 1:
        resources.update(mpi="srun", tasks_per_node=per_node)
    elif nodes > 1:  # one process per node; the plugin reads `tasks` as tasks per GPU unless told
        resources.update(mpi="srun", tasks=nodes, **({"tasks_per_gpu": 1} if gpus else {}))
    return resources


def compute_seconds(cfg: dict, family: str, size: str, tokens: int) -> float:
    """Seconds a job's tokens take at the configured throughput (no margin, no start-up)."""
    slurm = cfg.get("slurm", {})
    throughput = slurm.get("throughput_tokens_per_s", {}).get(size, 100_000) * max(slurm.get("gpus_per_job", 1), 1)
    if family != "dense":
        throughput *= slurm.get("moe_throughput_factor", 0.6)
    return tokens / throughput


def training_resources(cfg: dict, family: str, phase: str, size: str, tokens: int, experts: int = 1,
                       top_k: int = 1, granularity: int = 1) -> dict:
    """Per job: runtime (min), memory per node (MB), CPUs per process, the warning signal."""
    slurm = cfg.get("slurm", {})
    gpus = slurm.get("gpus_per_job", 1)
    per_node, _ = processes(cfg)
    warn = slurm.get("signal_seconds_before_limit", 300)
    seconds = compute_seconds(cfg, family, size, tokens) * slurm.get("runtime_margin", 1.5)
    # The warning comes `warn` seconds before the limit: the work must fit before it.
    runtime = math.ceil((seconds + warn) / 60 + slurm.get("startup_minutes", 5))
    params = count_params(_model(cfg, size, experts if family != "dense" else 1, top_k, granularity)).total
    if gpus:
        mem_mb = GPU_BASE_MEM_MB * per_node + math.ceil(params * GPU_EXPORT_BYTES_PER_PARAM / 1e6)
    else:
        mem_mb = (CPU_BASE_MEM_MB + math.ceil(params * CPU_BYTES_PER_PARAM / 1e6)) * per_node
    # USR1 to every process of the job `warn` seconds before the limit: the trainer checkpoints
    # and exits 75, and the retried job resumes. Without B: the signal reaches the job steps too.
    return {"runtime": runtime, "mem_mb": mem_mb, "cpus_per_task": cpus_per_process(cfg),
            "slurm_extra": f"--signal=USR1@{warn}", "tokens": tokens}


def job_resources(cfg: dict, family: str, phase: str, wildcards) -> dict:
    """Resources of a training rule's job, from its wildcards (Snakemake calls this)."""
    budget_key = {"dense": "d1", "upcycled": "d2", "scratch": "d"}[family]
    budget_or_point = int(wildcards.point if phase == "stable" else getattr(wildcards, budget_key))
    tokens = job_tokens(cfg, family, phase, budget_or_point)
    experts = int(getattr(wildcards, "experts", 1))
    top_k = int(getattr(wildcards, "top_k", 1))
    granularity = int(getattr(wildcards, "granularity", 1))
    resources = training_resources(cfg, family, phase, wildcards.size, tokens, experts, top_k, granularity)
    return {**resources, **launch_resources(cfg), **scheduler_placement(cfg)}


def scheduler_placement(cfg: dict) -> dict:
    slurm = cfg.get("slurm", {})
    placement = {}
    if slurm.get("partition"):
        placement["slurm_partition"] = slurm["partition"]
    account = slurm.get("account") or os.environ.get("SLURM_ACCOUNT")
    if account:
        placement["slurm_account"] = account
    return placement
