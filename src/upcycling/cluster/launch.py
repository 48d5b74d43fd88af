"""Training processes on Slurm: the torch.distributed environment of a task, and submitit.

Two ways a training stage runs on a Slurm cluster:

* Under Snakemake (``snakemake --profile slurm``): each job of a training rule is one Slurm job.
  A job with one GPU is one process; a job with more GPUs or nodes starts one process per GPU
  with ``srun`` inside its allocation (the rule's ``launcher`` resource, upcycling.cluster.resources), and
  every process takes RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT from Slurm's
  variables, read through submitit's ``SlurmJobEnvironment`` (:func:`apply_slurm_env`, at the
  start of ``upcycling train``).
* From Python (``upcycling submit``, :func:`submit_training`): submitit submits one training job
  as a :class:`TrainingTask`, a ``submitit.helpers.Checkpointable``: on a time-out or a preemption
  signal it stops the trainer (which saves its checkpoint and exits 75) and requeues itself; the
  requeued job runs the same command and the trainer resumes from its own checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from submitit.helpers import Checkpointable

from upcycling.cluster.resources import job_resources
from upcycling.core.errors import InputError
from upcycling.pipeline import jobargs
from upcycling.pipeline.jobs import Inventory
from upcycling.sweep.load import load_sweep

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75  # the trainer's exit code after a stop signal (upcycling.train.loop.EXIT_PREEMPTED)
PORT_BASE, PORT_SPAN = 12000, 20000  # below Linux's ephemeral ports (32768+)


# ----------------------------------------------------------------------------- Slurm environment


# torch.distributed's rendezvous variables: a task finds its own, never the submitting process's.
RENDEZVOUS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def slurm_torch_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The torch.distributed variables of this task of a multi-task Slurm step ({} otherwise).

    Only inside a step (``srun``) with several tasks: a process outside any step (the batch script
    itself) or a one-task step is one process whatever ``--ntasks`` says, and is left to the
    trainer's single-process path (a free local port, so two one-GPU jobs on a node never share
    one). A launcher that set RANK itself (torchrun, deepspeed) is left alone. Ranks and the job's
    hosts (Slurm's compressed node list expanded) come from submitit's SlurmJobEnvironment; the
    master is the job's first host, its port derived from the job id (the same on every rank).
    """
    environ = os.environ if environ is None else environ
    if "RANK" in environ or "SLURM_STEP_ID" not in environ:
        return {}
    tasks = int(environ.get("SLURM_STEP_NUM_TASKS") or environ.get("SLURM_NTASKS") or 1)
    if tasks <= 1:
        return {}
    from submitit.slurm.slurm import SlurmJobEnvironment

    job = SlurmJobEnvironment()
    nodes = int(environ.get("SLURM_STEP_NUM_NODES") or environ.get("SLURM_JOB_NUM_NODES") or 1)
    return {
        "RANK": str(job.global_rank),
        "WORLD_SIZE": str(tasks),
        "LOCAL_RANK": str(job.local_rank),
        "LOCAL_WORLD_SIZE": str(tasks // nodes),
        "MASTER_ADDR": environ.get("MASTER_ADDR") or job.hostnames[0],
        "MASTER_PORT": environ.get("MASTER_PORT") or str(PORT_BASE + int(job.job_id) % PORT_SPAN),
    }


def apply_slurm_env() -> dict[str, str]:
    """Put :func:`slurm_torch_env`'s variables into ``os.environ``; returns what it set."""
    updates = slurm_torch_env()
    if updates:
        os.environ.update(updates)
        log.info(
            "torch.distributed from Slurm: rank %s of %s (local rank %s), master %s:%s",
            updates["RANK"],
            updates["WORLD_SIZE"],
            updates["LOCAL_RANK"],
            updates["MASTER_ADDR"],
            updates["MASTER_PORT"],
        )
    return updates


def leave_stop_signals_to_the_trainer() -> None:
    """Ignore USR1 (Slurm's time-limit warning) and TERM (preemption, scancel, the limit) in this
    process: Snakemake's job wrapper inside a Slurm job. Slurm signals every process of the step;
    the trainer saves on them and exits 75, and the wrapper and the rule's shell must outlive that
    save. An ignored signal stays ignored across fork and exec, so the shell ignores them too; the
    trainer installs its own handlers (docs/slurm.md, "How the signal reaches the trainer")."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


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

    def __init__(
        self,
        config: str,
        train_args: Sequence[str],
        workdir: str | None = None,
        env: Mapping[str, str] | None = None,
        stop_timeout_s: float = 600.0,
    ):
        self.config = str(config)
        self.train_args = [str(arg) for arg in train_args]
        self.workdir = str(workdir or Path.cwd())
        self.env = dict(env or {})
        self.stop_timeout_s = stop_timeout_s
        self._pid: int | None = None

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "upcycling.cli",
            "train",
            "--config",
            self.config,
            "--workdir",
            self.workdir,
            *self.train_args,
        ]

    def child_env(self, environ: Mapping[str, str]) -> dict[str, str]:
        # sbatch exports the submitter's environment: a RANK or MASTER_PORT there (a process that
        # ran torch.distributed, a torchrun shell) would make every task rank 0 on a port in use.
        env = {key: value for key, value in environ.items() if key not in RENDEZVOUS} | self.env
        env |= slurm_torch_env(env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def __call__(self) -> dict:
        started = time.time()
        restart = int(os.environ.get("SLURM_RESTART_COUNT", 0) or 0)
        child = subprocess.Popen(
            self.command(), cwd=self.workdir, env=self.child_env(os.environ), preexec_fn=_ignore_usr2
        )
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
            raise RuntimeError(
                "the trainer was stopped (exit 75) and the job was not requeued: "
                "resubmit the same command and it resumes from its checkpoint"
            )
        if code != 0:
            raise RuntimeError(f"upcycling train {' '.join(self.train_args)} exited {code}")
        result = {
            "returncode": code,
            "seconds": time.time() - started,
            "restarts": restart,
            "job_id": os.environ.get("SLURM_JOB_ID"),
            "rank": int(os.environ.get("SLURM_PROCID", 0) or 0),
        }
        results_dir, job = self._job()
        metrics = job.train_spec.metrics  # relative to the results directory
        if metrics and Path(self.workdir, results_dir, metrics).is_file():
            payload = json.loads(Path(self.workdir, results_dir, metrics).read_text())
            result.update(metrics_path=metrics, final_val_loss=payload["final_val_loss"], run_id=payload["run_id"])
        return result

    def _job(self):
        rule, wildcards = jobargs.job_key(jobargs.parse(self.train_args))
        inventory = Inventory(load_sweep(self.config, base_dir=self.workdir, check_corpus=False))
        return inventory.sweep.results_dir, inventory.find(rule, wildcards)

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


def submit_training(
    config: str | os.PathLike,
    train_args: Sequence[str],
    folder: str | os.PathLike,
    *,
    partition: str | None = None,
    account: str | None = None,
    timeout_min: int | None = None,
    mem_gb: float | None = None,
    gpus_per_node: int | None = None,
    nodes: int | None = None,
    cpus_per_task: int | None = None,
    signal_delay_s: int | None = None,
    max_num_timeout: int = 3,
    workdir: str | os.PathLike | None = None,
    env: Mapping[str, str] | None = None,
    cluster: str | None = "slurm",
):
    """Submit one training stage (``upcycling train --config CFG *train_args``) with submitit.

    Everything not given comes from the job inventory and upcycling.cluster.resources, exactly as the
    Snakemake rule asks for the same job. With several GPUs or nodes, one task per GPU runs (each
    with its rank from Slurm). A time-out or preemption requeues the job (at most
    ``max_num_timeout`` time-outs) and the trainer resumes from its checkpoint. ``cluster="local"``
    runs it without Slurm (submitit's local executor), ``"debug"`` in this process. Returns the
    ``submitit.Job``; ``job.result()`` is a dict with the return code and, for a final job, its
    ``final_val_loss``.
    """
    import submitit

    workdir = str(Path(workdir).resolve()) if workdir else str(Path.cwd())
    sweep = load_sweep(config, base_dir=workdir, check_corpus=False)
    rule, wildcards = jobargs.job_key(jobargs.parse(train_args))
    resources = job_resources(sweep, Inventory(sweep).find(rule, wildcards))
    nodes = nodes if nodes is not None else int(resources["nodes"])
    if gpus_per_node is None:
        gpus_per_node = sweep.slurm.gpus_per_job // max(nodes, 1)
    signal_delay_s = signal_delay_s if signal_delay_s is not None else sweep.slurm.signal_seconds_before_limit
    executor = submitit.AutoExecutor(
        folder=str(folder),
        cluster=cluster,
        **({"slurm_max_num_timeout": max_num_timeout} if cluster in (None, "slurm") else {}),
    )
    params = dict(
        timeout_min=timeout_min or int(resources["runtime"]),
        nodes=nodes,
        tasks_per_node=max(gpus_per_node, 1),
        cpus_per_task=cpus_per_task or int(resources["cpus_per_task"]),
        mem_gb=mem_gb or resources["mem_mb"] / 1024,
        name="upcycling-train",
    )
    if gpus_per_node:
        params["gpus_per_node"] = gpus_per_node
    if executor.cluster == "slurm":
        params["slurm_signal_delay_s"] = signal_delay_s
        if partition or resources.get("slurm_partition"):
            params["slurm_partition"] = partition or resources["slurm_partition"]
        if account or resources.get("slurm_account"):
            params["slurm_additional_parameters"] = {"account": account or resources["slurm_account"]}
    executor.update_parameters(**params)
    task = TrainingTask(
        str(Path(config).resolve()), list(train_args), workdir, env, stop_timeout_s=max(30.0, signal_delay_s - 30.0)
    )
    job = executor.submit(task)
    log.info(
        "submitted %s as job %s (%s min, %.1f GB, %d node(s) x %d task(s), logs in %s)",
        " ".join(train_args),
        job.job_id,
        params["timeout_min"],
        params["mem_gb"],
        nodes,
        params["tasks_per_node"],
        folder,
    )
    return job


# ----------------------------------------------------------------------------- CLI (`upcycling submit`)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="config/config.yaml", help="sweep config YAML")
    parser.add_argument(
        "--folder",
        default="results/submitit/%j",
        help="submitit's folder for the job's pickles and logs (%%j: the job id)",
    )
    parser.add_argument("--workdir", default=".", help="directory the training runs in (relative paths start here)")
    parser.add_argument("--partition", help="Slurm partition (default: config slurm.partition, else the cluster's)")
    parser.add_argument("--account", help="Slurm account (default: config slurm.account / $SLURM_ACCOUNT)")
    parser.add_argument("--timeout-min", type=int, help="time limit (default: from the job's tokens and throughput)")
    parser.add_argument("--mem-gb", type=float, help="memory per node (default: from the parameter count)")
    parser.add_argument("--gpus-per-node", type=int, help="GPUs per node (default: config slurm.gpus_per_job / nodes)")
    parser.add_argument("--nodes", type=int, help="nodes (default: config slurm.nodes)")
    parser.add_argument("--cpus-per-task", type=int, help="CPUs per task (one task per GPU)")
    parser.add_argument(
        "--signal-delay-s",
        type=int,
        help="seconds before the limit at which the job checkpoints and requeues "
        "(default: config slurm.signal_seconds_before_limit)",
    )
    parser.add_argument("--max-requeues", type=int, default=3, help="time-outs after which it is not requeued again")
    parser.add_argument(
        "--cluster",
        default="slurm",
        choices=["slurm", "local", "debug"],
        help="slurm; local: a subprocess on this machine; debug: in this process",
    )
    parser.add_argument("--wait", action="store_true", help="wait for the job and print its result")
    parser.add_argument(
        "train_args",
        nargs=argparse.REMAINDER,
        help="after --: the arguments of `upcycling train` (e.g. -- --family dense --size xs --budget 8192)",
    )


def run(args: argparse.Namespace) -> int:
    train_args = list(args.train_args)
    if train_args and train_args[0] == "--":
        train_args = train_args[1:]
    if not train_args:
        raise InputError(
            "give the training job after --, e.g. `upcycling submit --config C -- --family dense "
            "--size xs --budget 8192`"
        )
    try:
        jobargs.parse(train_args)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    job = submit_training(
        args.config,
        train_args,
        args.folder,
        partition=args.partition,
        account=args.account,
        timeout_min=args.timeout_min,
        mem_gb=args.mem_gb,
        gpus_per_node=args.gpus_per_node,
        nodes=args.nodes,
        cpus_per_task=args.cpus_per_task,
        signal_delay_s=args.signal_delay_s,
        max_num_timeout=args.max_requeues,
        workdir=args.workdir,
        cluster=args.cluster,
    )
    print(f"submitted job {job.job_id}: upcycling train {' '.join(train_args)}")
    print(f"logs: {job.paths.stdout}")
    if args.wait:
        print(f"job {job.job_id} done: {job.result()}")
    return 0
