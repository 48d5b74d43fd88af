"""Preflight: can this Slurm cluster run every job of the sweep? Asked before the first sbatch.

``upcycling plan --check`` and a run with the Slurm profile (the Snakefile, before it submits
anything) read the cluster with ``sinfo``/``scontrol`` and refuse a sweep whose jobs no partition
can run, with one line per problem naming the config key to change:

- GPUs asked where no node of the partition has GRES gpu (``slurm.gpus_per_job``);
- more CPUs or memory per node than any node of the partition has (``slurm.cpus_per_gpu``,
  ``slurm.cpu_threads``, ``tokenizer.threads``, ``tokenizer.sample_bytes``, the model sizes);
- a runtime over the partition's MaxTime (``slurm.partition``, ``slurm.throughput_tokens_per_s``);
- a partition or an account that does not exist (``slurm.partition``, ``slurm.account``).

``read_cluster`` is the I/O (``scontrol show partition|node -o``, ``sacctmgr``); ``problems`` is a
pure function of the sweep's jobs and that picture of the cluster.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field

from upcycling.cluster.resources import CPU_BASE_MEM_MB, CPU_BYTES_PER_PARAM, job_params, job_resources
from upcycling.pipeline.jobs import Inventory, Job
from upcycling.sweep.settings import Sweep


@dataclass(frozen=True)
class Node:
    name: str
    cpus: int
    mem_mb: int
    gpus: int


@dataclass(frozen=True)
class Partition:
    name: str
    nodes: tuple[str, ...]
    max_minutes: float  # inf: UNLIMITED
    default: bool = False


@dataclass(frozen=True)
class Cluster:
    partitions: dict[str, Partition]
    nodes: dict[str, Node]
    accounts: frozenset[str] | None = None  # None: not known (no accounting)
    notes: list[str] = field(default_factory=list)


def _fields(line: str) -> dict[str, str]:
    """``Key=Value Key2=Value2`` (scontrol -o) as a mapping; values may not hold spaces."""
    return dict(re.findall(r"(\w+)=(\S*)", line))


def _minutes(limit: str) -> float:
    """Slurm's time (``UNLIMITED``, ``MM``, ``HH:MM:SS``, ``D-HH:MM:SS``) in minutes."""
    if limit in ("UNLIMITED", "INFINITE", ""):
        return float("inf")
    days, _, clock = limit.rpartition("-")
    parts = [int(value) for value in clock.split(":")]
    minutes: float
    if len(parts) == 1:
        minutes = parts[0]
    else:
        parts = [0] * (3 - len(parts)) + parts
        minutes = parts[0] * 60 + parts[1] + parts[2] / 60
    return minutes + (int(days) * 1440 if days else 0)


def _gpus(gres: str) -> int:
    """GPUs of a node's GRES string, e.g. ``gpu:h100:8(S:0-1)`` -> 8."""
    total = 0
    for item in gres.split(","):
        parts = item.split("(")[0].split(":")
        if parts[0] == "gpu" and parts[-1].isdigit():
            total += int(parts[-1])
    return total


def _expand(nodes: str) -> tuple[str, ...]:
    if not nodes or nodes == "(null)":
        return ()
    result = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, timeout=30)
    return tuple(result.stdout.split())


def read_cluster() -> Cluster | None:
    """The cluster as scontrol and sacctmgr show it; None where there is no Slurm to ask."""
    if shutil.which("scontrol") is None or shutil.which("sinfo") is None:
        return None
    if subprocess.run(["sinfo", "-h"], capture_output=True, timeout=30).returncode != 0:
        return None
    nodes = {}
    for line in subprocess.run(
        ["scontrol", "show", "node", "-o"], capture_output=True, text=True, timeout=30
    ).stdout.splitlines():
        info = _fields(line)
        if "NodeName" in info:
            nodes[info["NodeName"]] = Node(
                info["NodeName"],
                int(info.get("CPUTot", 0)),
                int(info.get("RealMemory", 0)),
                _gpus(info.get("Gres", "")),
            )
    partitions = {}
    for line in subprocess.run(
        ["scontrol", "show", "partition", "-o"], capture_output=True, text=True, timeout=30
    ).stdout.splitlines():
        info = _fields(line)
        if "PartitionName" in info:
            name = info["PartitionName"]
            partitions[name] = Partition(
                name, _expand(info.get("Nodes", "")), _minutes(info.get("MaxTime", "")), info.get("Default") == "YES"
            )
    accounts, notes = None, []
    if shutil.which("sacctmgr"):
        result = subprocess.run(
            ["sacctmgr", "-nP", "show", "account", "format=account"], capture_output=True, text=True, timeout=30
        )
        if result.returncode == 0:
            accounts = frozenset(line.strip() for line in result.stdout.splitlines() if line.strip())
        else:
            notes.append("accounts not checked: sacctmgr does not answer (no accounting database)")
    return Cluster(partitions, nodes, accounts, notes)


def problems(inventory: Inventory, cluster: Cluster) -> list[str]:
    """Every way the sweep's jobs do not fit the cluster, one line each naming the key to change."""
    sweep = inventory.sweep
    found: list[str] = []
    default = next((p for p in cluster.partitions.values() if p.default), None)
    if sweep.slurm.account and cluster.accounts is not None and sweep.slurm.account not in cluster.accounts:
        found.append(
            f"slurm.account: account '{sweep.slurm.account}' does not exist on this cluster "
            f"(sacctmgr knows {', '.join(sorted(cluster.accounts)) or 'none'}): fix it or set it to null"
        )
    seen: set[tuple] = set()
    for job in inventory.jobs:
        resources = job_resources(sweep, job)
        name = resources.get("slurm_partition") or (default.name if default else None)
        partition = cluster.partitions.get(name) if name else None
        if partition is None:
            missing = ("partition", name)
            if missing not in seen:
                seen.add(missing)
                found.append(
                    f"slurm.partition: partition '{name}' does not exist (the cluster has "
                    f"{', '.join(sorted(cluster.partitions))}): name one of those"
                    if name
                    else "slurm.partition: the cluster has no default partition: name one"
                )
            continue
        nodes = [cluster.nodes[n] for n in partition.nodes if n in cluster.nodes]
        per_node = max(int(resources.get("tasks_per_node", 1)), 1)
        gpus = int(resources.get("gpu", 0)) or (int(resources["gres"].split(":")[-1]) if "gres" in resources else 0)
        cpus, mem = int(resources.get("cpus_per_task", 1)) * per_node, int(resources.get("mem_mb", 0))
        checks = [
            (
                gpus and not any(node.gpus >= gpus for node in nodes),
                "gpus",
                f"slurm.gpus_per_job: {job.rule} jobs ask {gpus} GPU(s) per node, but no node of partition "
                f"'{partition.name}' has {'any' if not any(node.gpus for node in nodes) else 'that many'} (GRES gpu): "
                "set slurm.gpus_per_job: 0 to train on CPUs, or name a GPU partition in slurm.partition",
            ),
            (
                not any(node.cpus >= cpus for node in nodes),
                "cpus",
                f"{cpu_key(sweep, job)}: {job.rule} jobs ask {cpus} CPUs per node, but the nodes of partition "
                f"'{partition.name}' have at most {max((node.cpus for node in nodes), default=0)}: lower it",
            ),
            (
                not any(node.mem_mb >= mem for node in nodes),
                "mem",
                memory_advice(sweep, job, mem, partition.name, max((node.mem_mb for node in nodes), default=0)),
            ),
            (
                float(resources.get("runtime", 0)) > partition.max_minutes,
                "time",
                f"slurm.partition: a {job.rule} job needs {resources.get('runtime')} min ({job.label}), over partition "
                f"'{partition.name}''s MaxTime of {partition.max_minutes:.0f} min: name a partition with a longer "
                "limit, or check slurm.throughput_tokens_per_s (upcycling calibrate measures it)",
            ),
        ]
        for failed, kind, message in checks:
            # Memory grows with the model: one line per model size that does not fit.
            key = (kind, job.rule, partition.name, job.lineage.size if kind == "mem" and job.lineage else None)
            if failed and key not in seen:
                seen.add(key)
                found.append(message)
    return found


def cpu_key(sweep: Sweep, job: Job) -> str:
    """The config key that sets a job's CPUs: the tokens stage's threads, or a training process's."""
    if job.phase is None:
        return "tokenizer.threads" if job.cost is not None else f"--set-resources {job.rule}:cpus_per_task"
    return "slurm.cpus_per_gpu" if sweep.slurm.gpus_per_job else "slurm.cpu_threads"


def memory_advice(sweep: Sweep, job: Job, mem_mb: int, partition: str, node_mb: int) -> str:
    """Why a job asks more memory than any node has, and the keys that lower it or find a node."""
    larger = f"or name a partition with larger nodes (slurm.partition; the nodes of '{partition}' have {node_mb} MB)"
    asks = f"{job.rule} jobs ask {mem_mb} MB per node"
    if job.phase is None:
        if job.rule == "train_tokenizer":
            return f"tokenizer.sample_bytes: {asks} (to train the tokenizer on its sample): lower it, {larger}"
        return f"--set-resources {job.rule}:mem_mb: {asks}: lower it, {larger}"
    size = job.lineage.size if job.lineage else "?"
    params = job_params(sweep, job)
    if sweep.slurm.gpus_per_job:
        return (
            f"dense_models.{size}: {asks} (the host side of {params / 1e6:.0f}M parameters): spread the job over "
            f"more GPUs (slurm.gpus_per_job, slurm.nodes), {larger}"
        )
    fits = max((node_mb - CPU_BASE_MEM_MB) * 1e6 / CPU_BYTES_PER_PARAM, 0) / 1e6
    experts = " or fewer experts (sweep.experts)" if job.lineage and job.lineage.family != "dense" else ""
    return (
        f"dense_models.{size}: {asks}: slurm.gpus_per_job is 0, so a training process holds its whole fp32 state on "
        f"the host ({params / 1e6:.0f}M parameters at {CPU_BYTES_PER_PARAM} bytes each, plus {CPU_BASE_MEM_MB} MB), "
        f"and a node of partition '{partition}' holds at most {fits:.0f}M: make dense_models.{size} smaller"
        f"{experts} or drop it from the sweep, train on GPUs (slurm.gpus_per_job), {larger}"
    )
