"""Starting training processes on Slurm: multi-GPU/multi-node jobs, and submitit outside Snakemake.

Two ways a training stage runs on a Slurm cluster:

* Under Snakemake (``snakemake --profile slurm``): each job of a training rule is one Slurm job.
  A job with one GPU is one process. A job with more GPUs or nodes starts one process per GPU
  with ``srun`` inside its allocation (:func:`train_command` builds that line), and every process
  maps Slurm's task variables to the ones torch.distributed/DeepSpeed read
  (:func:`env_from_slurm`, applied by :func:`apply_slurm_env` when the training CLI starts).
* From Python (``upcycling submit``, :func:`submit_training`): submitit submits one training job
  as a :class:`TrainingTask`, which is ``submitit.helpers.Checkpointable``: on a time-out or a
  preemption signal it stops the trainer (which saves a DeepSpeed checkpoint and exits 75) and
  requeues itself; the requeued job runs the same command, and the trainer resumes from its own
  checkpoint (``results/checkpoints/...``).

Slurm's variables -> torch.distributed's (one srun task per GPU):

    SLURM_PROCID                    -> RANK
    SLURM_STEP_NUM_TASKS/NTASKS     -> WORLD_SIZE
    SLURM_LOCALID                   -> LOCAL_RANK     (the GPU index on its node)
    SLURM_NODEID                    -> NODE_RANK
    first host of SLURM_STEP_NODELIST / SLURM_JOB_NODELIST -> MASTER_ADDR
    SLURM_JOB_ID                    -> MASTER_PORT    (12000 + job id mod 20000, unless set)
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from submitit.helpers import Checkpointable

from .config import load_config

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75  # the trainer's exit code after a stop signal (upcycling.train.EXIT_PREEMPTED)
PORT_BASE, PORT_SPAN = 12000, 20000  # below Linux's ephemeral ports (32768+)
DIST_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")


# ----------------------------------------------------------------------------- Slurm environment


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed host list -> host names, in order.

    ``"gpu[01-03,07],login1"`` -> ``["gpu01", "gpu02", "gpu03", "gpu07", "login1"]``; several
    bracket groups in one name expand as a product (``"r[1-2]n[1-2]"`` -> r1n1, r1n2, r2n1, r2n2).
    Zero padding of a range's first bound is kept.
    """
    hosts: list[str] = []
    for group in _split_top_level(nodelist.strip()):
        names = [""]
        for literal, ranges in re.findall(r"([^\[\]]*)(?:\[([^\]]*)\])?", group):
            if not literal and ranges == "":
                continue
            suffixes = _expand_ranges(ranges) if ranges else [""]
            names = [name + literal + suffix for name in names for suffix in suffixes]
        hosts.extend(name for name in names if name)
    return hosts


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts, depth, current = [], 0, []
    for char in text:
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if current:
        parts.append("".join(current))
    if depth != 0:
        raise ValueError(f"unbalanced brackets in Slurm node list {text!r}")
    return [part for part in parts if part]


def _expand_ranges(ranges: str) -> list[str]:
    values: list[str] = []
    for item in ranges.split(","):
        if "-" in item:
            low, high = item.split("-", 1)
            width = len(low)
            values.extend(f"{number:0{width}d}" for number in range(int(low), int(high) + 1))
        elif item:
            values.append(item)
    return values


def master_port(job_id: str | int, offset: int = 0) -> int:
    """A port that every process of one job derives alike (and other jobs most likely not)."""
    return PORT_BASE + (int(job_id) + offset) % PORT_SPAN


def env_from_slurm(environ: Mapping[str, str]) -> dict[str, str]:
    """The torch.distributed variables of this process, from Slurm's (pure; see the module doc).

    Inside a job step (``srun``), every task is one rank. A process outside any step (the batch
    script itself, an ``salloc`` shell) is one process whatever ``--ntasks`` says: it gets
    WORLD_SIZE 1, so a command run there by mistake cannot wait forever for ranks that never
    start. A MASTER_ADDR or MASTER_PORT already set wins. Raises KeyError when SLURM_PROCID or
    the node list is missing (not inside a Slurm job).
    """
    in_step = "SLURM_STEP_ID" in environ
    if in_step:
        rank = int(environ["SLURM_PROCID"])
        world = int(environ.get("SLURM_STEP_NUM_TASKS") or environ.get("SLURM_NTASKS")
                    or environ.get("SLURM_NPROCS") or 1)
        local_rank = int(environ.get("SLURM_LOCALID", 0))
        node_rank = int(environ.get("SLURM_NODEID", 0))
    else:
        int(environ["SLURM_PROCID"])  # a Slurm process at all?
        rank, world, local_rank, node_rank = 0, 1, 0, 0
    nodelist = (environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST")
                or environ.get("SLURM_NODELIST"))
    if not nodelist:
        raise KeyError("SLURM_JOB_NODELIST")
    hosts = expand_nodelist(nodelist)
    if not hosts:
        raise ValueError(f"empty Slurm node list {nodelist!r}")
    if not 0 <= rank < world:
        raise ValueError(f"SLURM_PROCID={rank} is outside the step's {world} tasks")
    job_id = environ.get("SLURM_JOB_ID") or environ.get("SLURM_JOBID") or "0"
    return {
        "RANK": str(rank),
        "WORLD_SIZE": str(world),
        "LOCAL_RANK": str(local_rank),
        "NODE_RANK": str(node_rank),
        "MASTER_ADDR": environ.get("MASTER_ADDR") or hosts[0],
        "MASTER_PORT": environ.get("MASTER_PORT") or str(master_port(job_id)),
    }


def apply_slurm_env(environ: os._Environ | dict | None = None) -> dict[str, str]:
    """Put :func:`env_from_slurm`'s variables into ``environ`` (default ``os.environ``).

    Does nothing (returns ``{}``) outside Slurm, when RANK is already set (torchrun, deepspeed or
    a caller set it), or for a one-process step: the trainer's single-process path then picks a
    free local port itself, so two one-GPU jobs on one node never share a port. Returns what it set.
    """
    environ = os.environ if environ is None else environ
    if "SLURM_PROCID" not in environ or "RANK" in environ:
        return {}
    try:
        updates = env_from_slurm(environ)
    except (KeyError, ValueError) as exc:
        log.warning("Slurm environment not usable for torch.distributed (%s): running as one process", exc)
        return {}
    if updates["WORLD_SIZE"] == "1":
        return {}
    environ.update(updates)
    log.info("torch.distributed from Slurm: rank %s of %s (local rank %s), master %s:%s", updates["RANK"],
             updates["WORLD_SIZE"], updates["LOCAL_RANK"], updates["MASTER_ADDR"], updates["MASTER_PORT"])
    return updates


# ----------------------------------------------------------------------------- multi-GPU commands


def srun_prefix(gpus_per_node: int, nodes: int = 1, cpus_per_task: int | None = None,
                extra: Sequence[str] = ()) -> list[str]:
    """``srun`` arguments that start one task per GPU on every node of the allocation; ``[]`` for
    a one-process job (one GPU, or CPU only, on one node).

    Each task sees all GPUs of its node (a step gets the job's GPUs by default) and picks its own
    with LOCAL_RANK. ``--kill-on-bad-exit`` ends the other ranks when one dies, instead of leaving
    them waiting in a collective until the time limit. Without ``B:``, Slurm's ``--signal`` (the
    USR1 before the time limit) reaches every task of the step, and the trainer's all-reduced stop
    flag makes all ranks checkpoint together.
    """
    tasks_per_node = max(int(gpus_per_node), 1)
    if tasks_per_node * max(int(nodes), 1) <= 1:
        return []
    args = ["srun", f"--nodes={nodes}", f"--ntasks-per-node={tasks_per_node}", "--kill-on-bad-exit=1"]
    if cpus_per_task:
        args.append(f"--cpus-per-task={cpus_per_task}")
    return [*args, *extra]


def train_command(config: str | os.PathLike, train_args: Sequence[str], gpus_per_node: int = 1,
                  nodes: int = 1, cpus_per_task: int | None = None,
                  program: Sequence[str] = ("upcycling",), srun_extra: Sequence[str] = ()) -> list[str]:
    """The command of one training job inside its allocation, e.g. with 8 GPUs on 2 nodes::

        srun --nodes=2 --ntasks-per-node=8 --kill-on-bad-exit=1 --cpus-per-task=4 \\
             upcycling train --config C --family dense --size s --budget D

    ``program`` is what runs the CLI (e.g. ``("python", "-m", "upcycling.cli")`` for a given
    interpreter).
    """
    return [*srun_prefix(gpus_per_node, nodes, cpus_per_task, srun_extra), *program, "train",
            "--config", str(config), *train_args]


# ----------------------------------------------------------------------------- submitit


def _ignore_usr2() -> None:  # pragma: no cover - runs in the child between fork and exec
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


class TrainingTask(Checkpointable):
    """One training stage as a submitit job: runs ``upcycling train`` as a child process.

    submitit sends the job ``USR2`` ``signal_delay_s`` before its time limit (and
    ``job._interrupt()`` simulates a preemption with TERM + USR2). Its handler calls
    :meth:`checkpoint`, which forwards USR1 to the trainer, waits while the trainer saves its
    DeepSpeed checkpoint and exits 75, and hands submitit a fresh copy of this task to requeue.
    The requeued job runs the same command, and the trainer resumes from its own checkpoint.
    The child ignores USR2 itself (Slurm signals every process of the step). A TERM (a Slurm
    preemption with PreemptMode=REQUEUE, or ``scancel``) reaches the trainer directly; it saves
    and exits 75, and the task waits for Slurm to requeue or end the job.
    """

    def __init__(self, config: str, train_args: Sequence[str], workdir: str | None = None,
                 env: Mapping[str, str] | None = None, stop_timeout_s: float = 600.0):
        self.config = str(config)
        self.train_args = [str(arg) for arg in train_args]
        self.workdir = str(workdir or Path.cwd())
        self.env = dict(env or {})
        self.stop_timeout_s = stop_timeout_s
        self._pid: int | None = None

    def command(self) -> list[str]:
        return [sys.executable, "-m", "upcycling.cli", "train", "--config", self.config, *self.train_args]

    def child_env(self, environ: Mapping[str, str]) -> dict[str, str]:
        env = {**environ, **self.env}
        if "SLURM_PROCID" in env and "RANK" not in env:
            try:
                updates = env_from_slurm(env)
            except (KeyError, ValueError):
                updates = {"WORLD_SIZE": "1"}
            if updates["WORLD_SIZE"] != "1":
                env.update(updates)
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def __call__(self) -> dict:
        import json

        started = time.time()
        restart = int(os.environ.get("SLURM_RESTART_COUNT", 0) or 0)
        child = subprocess.Popen(self.command(), cwd=self.workdir, env=self.child_env(os.environ),
                                 preexec_fn=_ignore_usr2)
        self._pid = child.pid
        # Poll, never block in wait(): submitit's signal handler (checkpoint) runs in this thread.
        while (code := child.poll()) is None:
            time.sleep(0.5)
        self._pid = None
        if code == EXIT_PREEMPTED:
            # Stopped by a signal that did not come through submitit (TERM: preemption or
            # scancel). Its checkpoint is saved; Slurm requeues or ends the job: wait for that.
            log.warning("trainer stopped by a signal and saved its checkpoint; waiting for Slurm")
            time.sleep(self.stop_timeout_s)
            raise RuntimeError("the trainer was stopped (exit 75) and the job was not requeued: "
                               "resubmit the same command and it resumes from its checkpoint")
        if code != 0:
            raise RuntimeError(f"upcycling train {' '.join(self.train_args)} exited {code}")
        result = {"returncode": code, "seconds": time.time() - started, "restarts": restart,
                  "job_id": os.environ.get("SLURM_JOB_ID"), "rank": int(os.environ.get("SLURM_PROCID", 0) or 0)}
        try:
            metrics = self.metrics_path()
        except Exception as exc:  # the training succeeded; a result without metrics is still one
            log.warning("could not locate the run's metrics: %s", exc)
            metrics = None
        if metrics is not None and metrics.is_file():
            payload = json.loads(metrics.read_text())
            result.update(metrics_path=str(metrics), final_val_loss=payload.get("final_val_loss"),
                          run_id=payload.get("run_id"))
        return result

    def metrics_path(self) -> Path | None:
        """Where the trainer writes this job's metrics (a final job), from the config and args."""
        args = parse_train_args(self.train_args)
        if args.budget is None:
            return None
        from . import sweep

        cfg = load_config(self.config, check_corpus=False)
        path = sweep.metrics_path(cfg, _lineage(args), args.budget)
        return path if path.is_absolute() else Path(self.workdir) / path

    def checkpoint(self, *args, **kwargs):
        """submitit's hook on a time-out/preemption signal: stop the trainer so it saves, then requeue."""
        from submitit.helpers import DelayedSubmission

        pid = self._pid
        if pid is not None:
            try:
                os.kill(pid, signal.SIGUSR1)
                deadline = time.time() + self.stop_timeout_s
                while time.time() < deadline:
                    done, _ = os.waitpid(pid, os.WNOHANG)
                    if done:
                        break
                    time.sleep(0.2)
            except (ProcessLookupError, ChildProcessError):
                pass
        fresh = TrainingTask(self.config, self.train_args, self.workdir, self.env, self.stop_timeout_s)
        return DelayedSubmission(fresh)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_pid"] = None
        return state


_TRAIN_FLAGS = argparse.ArgumentParser(add_help=False)
_TRAIN_FLAGS.add_argument("--family", choices=["dense", "upcycled", "scratch"], required=True)
_TRAIN_FLAGS.add_argument("--size", required=True)
_TRAIN_FLAGS.add_argument("--seed", type=int, default=0)
_TRAIN_FLAGS.add_argument("--d1", type=int, default=0)
_TRAIN_FLAGS.add_argument("--experts", type=int, default=1)
_TRAIN_FLAGS.add_argument("--top-k", type=int, default=1)
_TRAIN_FLAGS.add_argument("--granularity", type=int, default=1)
_TRAIN_FLAGS.add_argument("--stable", type=int)
_TRAIN_FLAGS.add_argument("--budget", type=int)


def parse_train_args(train_args: Sequence[str]) -> argparse.Namespace:
    """The flags of ``upcycling train`` that identify a job (others are ignored)."""
    args, _ = _TRAIN_FLAGS.parse_known_args(list(train_args))
    if (args.stable is None) == (args.budget is None):
        raise ValueError("training arguments need exactly one of --stable POINT or --budget D")
    return args


def _lineage(args: argparse.Namespace):
    from .sweep import Lineage

    if args.family == "dense":
        return Lineage("dense", args.size, args.seed)
    return Lineage(args.family, args.size, args.seed, args.d1 if args.family == "upcycled" else 0,
                   args.experts, args.top_k, args.granularity)


def job_resources_for_args(cfg: dict, train_args: Sequence[str]) -> dict:
    """resources.py's per-job resources (runtime, mem_mb, gpu, ...) for one training command."""
    from types import SimpleNamespace

    from .resources import job_resources

    args = parse_train_args(train_args)
    phase = "stable" if args.stable is not None else "final"
    value = args.stable if phase == "stable" else args.budget
    wildcards = SimpleNamespace(size=args.size, seed=args.seed, point=value, d1=args.d1 or value,
                                d2=value, d=value, experts=args.experts, top_k=args.top_k,
                                granularity=args.granularity)
    if args.family == "upcycled":
        wildcards.d1 = args.d1
    return job_resources(cfg, args.family, phase, wildcards)


def submit_training(cfg_path: str | os.PathLike, train_args: Sequence[str], folder: str | os.PathLike,
                    *, partition: str | None = None, account: str | None = None,
                    timeout_min: int | None = None, mem_gb: float | None = None,
                    gpus_per_node: int | None = None, nodes: int | None = None,
                    cpus_per_task: int | None = None, signal_delay_s: int | None = None,
                    max_num_timeout: int = 3, workdir: str | os.PathLike | None = None,
                    env: Mapping[str, str] | None = None, cluster: str | None = "slurm",
                    additional_parameters: Mapping | None = None):
    """Submit one training stage (``upcycling train --config CFG *train_args``) with submitit.

    Everything not given comes from the config as the Snakemake rules compute it
    (upcycling.resources: runtime from tokens and throughput, memory from parameters, GPUs, nodes,
    partition/account, the warning signal's lead time). With several GPUs or nodes, one task per
    GPU runs (each maps Slurm's variables to RANK/WORLD_SIZE/...). A time-out or preemption
    requeues the job (at most ``max_num_timeout`` time-outs) and the trainer resumes from its
    checkpoint. ``cluster="local"`` runs it without Slurm (submitit's local executor), ``"debug"``
    in this process. Returns the ``submitit.Job``; ``job.result()`` is a dict with the return code
    and, for a final job, its ``final_val_loss``.
    """
    import submitit

    cfg = load_config(cfg_path, check_corpus=False)
    resources = job_resources_for_args(cfg, train_args)
    slurm_cfg = cfg.get("slurm", {})
    nodes = nodes if nodes is not None else int(resources["nodes"])
    if gpus_per_node is None:
        gpus_per_node = int(slurm_cfg.get("gpus_per_job", 1)) // max(nodes, 1)
    tasks_per_node = max(gpus_per_node, 1)
    cpus_per_task = cpus_per_task if cpus_per_task is not None else int(resources["cpus_per_task"])
    timeout_min = timeout_min if timeout_min is not None else int(resources["runtime"])
    mem_gb = mem_gb if mem_gb is not None else resources["mem_mb"] / 1024
    signal_delay_s = signal_delay_s if signal_delay_s is not None else int(
        slurm_cfg.get("signal_seconds_before_limit", 300))
    partition = partition or resources.get("slurm_partition")
    account = account or resources.get("slurm_account")

    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster,
                                     **({"slurm_max_num_timeout": max_num_timeout} if cluster in (None, "slurm") else {}))
    params = dict(timeout_min=timeout_min, nodes=nodes, tasks_per_node=tasks_per_node,
                  cpus_per_task=cpus_per_task, mem_gb=mem_gb, name="upcycling-train")
    if gpus_per_node:
        params["gpus_per_node"] = gpus_per_node
    if executor.cluster == "slurm":
        params["slurm_signal_delay_s"] = signal_delay_s
        if partition:
            params["slurm_partition"] = partition
        extra = dict(additional_parameters or {})
        if account:
            extra.setdefault("account", account)
        if extra:
            params["slurm_additional_parameters"] = extra
    executor.update_parameters(**params)
    task = TrainingTask(str(Path(cfg_path).resolve()), list(train_args),
                        str(Path(workdir).resolve()) if workdir else str(Path.cwd()), env,
                        stop_timeout_s=max(30.0, signal_delay_s - 30.0))
    job = executor.submit(task)
    log.info("submitted %s as job %s (%s min, %.1f GB, %d node(s) x %d task(s), logs in %s)",
             " ".join(train_args), job.job_id, timeout_min, mem_gb, nodes, tasks_per_node, folder)
    return job


# ----------------------------------------------------------------------------- CLI (`upcycling submit`)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="config/config.yaml", help="sweep config YAML")
    parser.add_argument("--folder", default="results/submitit/%j",
                        help="submitit's folder for the job's pickles and logs (%%j: the job id)")
    parser.add_argument("--workdir", default=".", help="directory the training runs in (relative paths start here)")
    parser.add_argument("--partition", help="Slurm partition (default: config slurm.partition, else the cluster's)")
    parser.add_argument("--account", help="Slurm account (default: config slurm.account / $SLURM_ACCOUNT)")
    parser.add_argument("--timeout-min", type=int, help="time limit (default: from the job's tokens and throughput)")
    parser.add_argument("--mem-gb", type=float, help="memory per node (default: from the parameter count)")
    parser.add_argument("--gpus-per-node", type=int, help="GPUs per node (default: config slurm.gpus_per_job / nodes)")
    parser.add_argument("--nodes", type=int, help="nodes (default: config slurm.nodes)")
    parser.add_argument("--cpus-per-task", type=int, help="CPUs per task (one task per GPU)")
    parser.add_argument("--signal-delay-s", type=int,
                        help="seconds before the limit at which the job checkpoints and requeues "
                             "(default: config slurm.signal_seconds_before_limit)")
    parser.add_argument("--max-requeues", type=int, default=3, help="time-outs after which it is not requeued again")
    parser.add_argument("--cluster", default="slurm", choices=["slurm", "local", "debug"],
                        help="slurm; local: a subprocess on this machine; debug: in this process")
    parser.add_argument("--wait", action="store_true", help="wait for the job and print its result")
    parser.add_argument("train_args", nargs=argparse.REMAINDER,
                        help="after --: the arguments of `upcycling train` (e.g. -- --family dense --size xs --budget 8192)")


def run(args: argparse.Namespace) -> int:
    train_args = list(args.train_args)
    if train_args and train_args[0] == "--":
        train_args = train_args[1:]
    if not train_args:
        print("error: give the training job after --, e.g. `upcycling submit --config C -- --family dense "
              "--size xs --budget 8192`", file=sys.stderr)
        return 2
    try:
        parse_train_args(train_args)
    except (ValueError, SystemExit) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    job = submit_training(args.config, train_args, args.folder, partition=args.partition, account=args.account,
                          timeout_min=args.timeout_min, mem_gb=args.mem_gb, gpus_per_node=args.gpus_per_node,
                          nodes=args.nodes, cpus_per_task=args.cpus_per_task, signal_delay_s=args.signal_delay_s,
                          max_num_timeout=args.max_requeues, workdir=args.workdir, cluster=args.cluster)
    print(f"submitted job {job.job_id}: upcycling train {' '.join(train_args)}")
    print(f"logs: {job.paths.stdout}")
    if args.wait:
        result = job.result()
        print(f"job {job.job_id} done: {result}")
    return 0
