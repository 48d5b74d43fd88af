"""The process group of a training job, and the few collectives the trainer issues itself.

One process per GPU. On CUDA the default process group is device-mapped,
``cpu:gloo,cuda:nccl``: collectives on GPU tensors go through NCCL and collectives on host tensors
through gloo. That removes a whole class of first-contact GPU crashes (NCCL rejects host tensors,
and a small host-side flag such as the stop check would otherwise need a device round trip and a
host synchronisation every step), and DeepSpeed's sub-groups (expert and data parallel) inherit
the same mapping. Without CUDA the group is plain gloo.

Single process without a launcher: RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR are filled in and
MASTER_PORT is a free local port (an inherited one is not trusted), so DeepSpeed never looks for MPI.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist

CUDA_BACKEND = "cpu:gloo,cuda:nccl"


def init(backend: str | None = None) -> torch.device:
    """Start (or join) the process group; returns this rank's device."""
    import deepspeed

    if "RANK" not in os.environ:
        # Alone: a fresh free port even where MASTER_PORT is inherited (a shell or a Slurm job's
        # --export=ALL environment can carry the port of a process that still listens on it).
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = str(sock.getsockname()[1])
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    device = device_for_rank()
    if device.type != "cuda":
        _skip_shm_comm_op()
    if not dist.is_initialized():
        backend = backend or (CUDA_BACKEND if device.type == "cuda" else "gloo")
        dist.init_process_group(backend=backend)
    # DeepSpeed adopts the group that exists (its communication backend is NCCL on CUDA).
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False)
    return device


def _skip_shm_comm_op() -> None:
    """Keep DeepSpeed's CPU backend from loading its shared-memory op, which serves only its
    inference all-reduce (training collectives go through torch.distributed and gloo). Loading
    it JIT-builds C++ under a lock file in TORCH_EXTENSIONS_DIR (30 s idle, minutes on a busy
    node) on every process start, and a process killed while it holds that lock (a requeue, a
    scancel, kill -9) leaves the file behind: every later job then waits on it silently until
    its time limit (seen on the local Slurm cluster: a requeued job hung 6 minutes)."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def device_for_rank() -> torch.device:
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def rank() -> int:
    return dist.get_rank()


def world_size() -> int:
    return dist.get_world_size()


def barrier() -> None:
    dist.barrier()


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on any (a host tensor: gloo, no device round trip)."""
    if world_size() == 1:
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.uint8)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """The element-wise mean over ranks of a tensor on this rank's device."""
    if world_size() > 1:
        values = values.clone()
        dist.all_reduce(values)
        values /= world_size()
    return values


def sum_over_expert_group(values: torch.Tensor, ep_size: int) -> torch.Tensor:
    """The element-wise sum of a tensor over this rank's expert-parallel group (the ranks that
    hold the other experts of its layers); the tensor itself when ep_size is 1."""
    if ep_size == 1:
        return values
    group, _ = expert_parallel_group(ep_size)
    values = values.clone()
    dist.all_reduce(values, group=group)
    return values


def expert_parallel_group(ep_size: int):
    """DeepSpeed's expert-parallel group of this rank, and the rank in it. DeepSpeed exposes these
    only through private helpers: they are used here and nowhere else."""
    from deepspeed.utils import groups

    name = f"ep_size_{ep_size}"
    return groups._get_expert_parallel_group(name), groups._get_expert_parallel_rank(name)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
