"""What each job asks the scheduler for, computed from the work it does (pure functions of a job
of the inventory and the sweep).

A training job's runtime is its tokens over the configured throughput of its model size (one
training process: a GPU, or the CPU cores of a CPU-only job; measured with
benchmarks/bench_train.py; MoE runs are slower by ``moe_throughput_factor``), times a safety
margin, plus start-up and the lead of the warning signal; memory grows with the parameter count
and the processes per node. Resource names are those of snakemake-executor-plugin-slurm
(``runtime`` in minutes, ``mem_mb``, ``gpu``, ``cpus_per_task``, ``slurm_extra``,
``slurm_partition``, ``slurm_account``); ``--set-resources`` overrides any of them.

Two resources are ours and never reach the scheduler: ``launcher`` (the ``srun`` that starts one
process per GPU inside a multi-GPU allocation, empty otherwise) and ``run_options`` (the trainer's
operational flags). They are resources, not params, because Snakemake's rerun triggers ignore
resources: changing how often a job logs or checkpoints, or how it is launched, reruns nothing.
"""

from __future__ import annotations

import math
import os
import shlex

from upcycling.model.flops import CHECKPOINT_BYTES_PER_PARAM, count_params
from upcycling.pipeline.jobs import Job
from upcycling.pipeline.lineages import lineage_model
from upcycling.sweep.settings import Sweep

# Host memory of one training process. Without a GPU it holds the whole training state: Adam in
# fp32 is weights, gradients and two moments (16 bytes/param), twice over while a checkpoint is
# serialised. With a GPU the state lives there; the host holds the CUDA/NCCL/Python runtime per
# process and, on rank 0, the fp32 export of the weights and Adam moments (12 bytes/param).
CPU_BYTES_PER_PARAM = 32
GPU_EXPORT_BYTES_PER_PARAM = 12
CPU_BASE_MEM_MB = 3000
GPU_BASE_MEM_MB = 6000
EXPORT_BYTES_PER_PARAM = 4  # safetensors export in fp32
# Shared file systems of GPU clusters write ~1-5 GB/s per job; the plan's save-time estimate uses
# the low end (a checkpoint save must fit in the warning signal's lead).
CHECKPOINT_WRITE_BYTES_PER_S = 1e9
DEFAULT_THROUGHPUT = 100_000  # tokens/s when the config gives none
SMALL_JOB = {"runtime": 30, "mem_mb": 4000, "cpus_per_task": 1}


def processes(sweep: Sweep) -> tuple[int, int]:
    """(training processes per node, nodes) of every training job: one process per GPU."""
    slurm = sweep.slurm
    return max(slurm.gpus_per_job // slurm.nodes, 1), slurm.nodes


def cpus_per_process(sweep: Sweep) -> int:
    """CPUs of one training process: per GPU with GPUs, the job's threads without. Also a training
    rule's threads (OMP_NUM_THREADS), so a CPU job uses all of its allocation."""
    return sweep.slurm.cpus_per_gpu if sweep.slurm.gpus_per_job else sweep.slurm.cpu_threads


def launcher(sweep: Sweep) -> str:
    """``srun`` arguments that start one task per GPU on every node of the allocation; ``""`` for a
    one-process job (one GPU, or CPU only, on one node).

    Each task sees all GPUs of its node and picks its own with LOCAL_RANK. ``--kill-on-bad-exit``
    ends the other ranks when one dies, instead of leaving them waiting in a collective until the
    time limit.
    """
    per_node, nodes = processes(sweep)
    if per_node * nodes <= 1:
        return ""
    return (
        f"srun --nodes={nodes} --ntasks-per-node={per_node} --kill-on-bad-exit=1 "
        f"--cpus-per-task={cpus_per_process(sweep)}"
    )


def launch_resources(sweep: Sweep) -> dict:
    """The same for every training job: how the plugin starts its processes and places its GPUs.

    With several processes the rule's command starts them itself with ``srun`` (:func:`launcher`),
    so the plugin must run that command in the batch script (``mpi``) with the task count set,
    instead of inside a one-task step of its own that would hold the allocation. GPUs: ``--gpus=N``
    for one node; ``--gres=gpu:n`` per node for several (``--gpus`` may spread unevenly)."""
    gpus = sweep.slurm.gpus_per_job
    per_node, nodes = processes(sweep)
    resources: dict[str, int | str] = {"nodes": nodes, "gpu": gpus if nodes == 1 else 0}
    if nodes > 1 and gpus:
        resources["gres"] = f"gpu:{per_node}"
    if per_node > 1:
        resources.update(mpi="srun", tasks_per_node=per_node)
    elif nodes > 1:  # one process per node; the plugin reads `tasks` as tasks per GPU unless told
        resources.update(mpi="srun", tasks=nodes, **({"tasks_per_gpu": 1} if gpus else {}))
    return resources


def scheduler_placement(sweep: Sweep) -> dict:
    placement = {}
    if sweep.slurm.partition:
        placement["slurm_partition"] = sweep.slurm.partition
    account = sweep.slurm.account or os.environ.get("SLURM_ACCOUNT")
    if account:
        placement["slurm_account"] = account
    return placement


def job_params(sweep: Sweep, job: Job) -> int:
    """Total parameters of the model a job trains or writes (0 for jobs without one)."""
    if job.lineage is None:
        return 0
    return count_params(lineage_model(sweep, job.lineage)).total


def compute_seconds(sweep: Sweep, family: str, size: str, tokens: int) -> float:
    """Seconds a job's tokens take at the configured throughput (no margin, no start-up)."""
    slurm = sweep.slurm
    per_process = (slurm.throughput_tokens_per_s or {}).get(size, DEFAULT_THROUGHPUT)
    throughput = per_process * max(slurm.gpus_per_job, 1)
    if family != "dense":
        throughput *= slurm.moe_throughput_factor
    return tokens / throughput


def training_seconds(sweep: Sweep, job: Job) -> float:
    """compute_seconds of a training job (one with a lineage: the model it trains)."""
    if job.lineage is None:
        raise ValueError(f"{job.label} is not a training job: it has no lineage to time")
    return compute_seconds(sweep, job.lineage.family, job.lineage.size, job.tokens)


def precision(sweep: Sweep) -> str:
    """The precision a training job will run in where the sweep is scheduled."""
    configured = sweep.training.precision
    if configured == "auto":
        return "bf16" if sweep.slurm.gpus_per_job else "fp32"
    return configured


def checkpoint_bytes(sweep: Sweep, job: Job) -> int:
    """Disk of one DeepSpeed checkpoint of the job's model (0 for jobs that write none)."""
    if job.phase is None:
        return 0
    return job_params(sweep, job) * CHECKPOINT_BYTES_PER_PARAM[precision(sweep)]


def output_bytes(sweep: Sweep, job: Job) -> int:
    """Disk of a job's lasting outputs: exports (dense final, transform) and stable checkpoints."""
    if job.rule in ("dense_final", "transform"):
        return job_params(sweep, job) * EXPORT_BYTES_PER_PARAM
    if job.phase == "stable":
        return checkpoint_bytes(sweep, job)
    return 0


def history_log(job: Job) -> str:
    """Where a training job's log lines of every attempt are appended (Snakemake deletes the job's
    own log before each attempt)."""
    return job.log.removesuffix(".log") + ".attempts.log"


def training_resources(sweep: Sweep, job: Job) -> dict:
    """Per training job: runtime (min), memory per node (MB), CPUs per process, the warning signal."""
    slurm = sweep.slurm
    per_node, _ = processes(sweep)
    warn = slurm.signal_seconds_before_limit
    seconds = training_seconds(sweep, job) * slurm.runtime_margin
    # The warning comes `warn` seconds before the limit: the work must fit before it.
    runtime = math.ceil((seconds + warn) / 60 + slurm.startup_minutes)
    params = job_params(sweep, job)
    if slurm.gpus_per_job:
        mem_mb = GPU_BASE_MEM_MB * per_node + math.ceil(params * GPU_EXPORT_BYTES_PER_PARAM / 1e6)
    else:
        mem_mb = (CPU_BASE_MEM_MB + math.ceil(params * CPU_BYTES_PER_PARAM / 1e6)) * per_node
    options = (
        f"--log-every-steps {sweep.training.log_every_steps} "
        f"--checkpoint-every-tokens {sweep.training.checkpoint_every_tokens} "
        f"--history-log {shlex.quote(history_log(job))}"  # run_options is shell text: a results_dir may hold spaces
    )
    if sweep.training.keep_final_checkpoints:
        options += " --keep-checkpoint"
    # USR1 to every process of the job `warn` seconds before the limit: the trainer checkpoints
    # and exits 75, and the retried job resumes. Without B: the signal reaches the job steps too.
    return {
        "runtime": runtime,
        "mem_mb": mem_mb,
        "cpus_per_task": cpus_per_process(sweep),
        "slurm_extra": f"--signal=USR1@{warn}",
        "launcher": launcher(sweep),
        "run_options": options,
        **launch_resources(sweep),
        **scheduler_placement(sweep),
    }


def job_resources(sweep: Sweep, job: Job) -> dict:
    """Resources of any job of the inventory (Snakemake calls this through the rules)."""
    if job.phase is not None:
        return training_resources(sweep, job)
    if job.cost is not None:  # the tokens stage: estimated from the corpus bytes (upcycling.data.tokens)
        from upcycling.data.tokens import slurm_resources

        return {**slurm_resources(job.cost, sweep.mapping), **scheduler_placement(sweep)}
    resources = dict(SMALL_JOB, **scheduler_placement(sweep))
    if job.rule == "transform":  # dense and second-stage state in fp32, a few copies while converting
        resources["mem_mb"] = CPU_BASE_MEM_MB + math.ceil(job_params(sweep, job) * 16 / 1e6)
    elif job.rule == "fit":
        resources["cpus_per_task"] = 2
    return resources
