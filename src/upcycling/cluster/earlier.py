"""The Slurm jobs an earlier, dead `snakemake --profile slurm` run left behind.

A driver that dies (a dropped login session, kill -9) leaves its Slurm jobs queued and running.
Snakemake does not know them when it starts again: it marks their outputs incomplete, submits the
same jobs under a new run id, and the old and new copy of a job train at once (and the new one may
delete a stable checkpoint the old one just wrote). So before the first submission, the driver
(common.smk's ``onstart``) cancels every live job of this workflow that an earlier run submitted:
the jobs the Slurm plugin submits from this working directory, recognised by the comment it gives
each (``rule_<rule>[_wildcards_<wildcards>]``). Cancelling rather than waiting is the choice because
Snakemake reruns those jobs anyway (their outputs are marked incomplete): ``scancel`` sends SIGTERM,
the trainer saves its checkpoint and exits, and the new run's job resumes from that checkpoint, so
no token is trained twice. The driver waits until the cancelled jobs have left the queue, so the
new copy never starts beside the old one saving.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

__all__ = ["QueuedJob", "cancel_earlier_jobs", "earlier_jobs", "parse_squeue"]

log = logging.getLogger(__name__)

# squeue's fields, "|"-separated: id, state, name (the plugin's run id), comment, working directory.
SQUEUE_FORMAT = "%i|%T|%j|%k|%Z"
# States in which a job still runs or may start; any other state means it has left the queue.
LIVE_STATES = frozenset(
    {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD", "RESIZING"}
)


@dataclass(frozen=True)
class QueuedJob:
    job_id: str
    state: str
    run_id: str  # the Slurm job name: the plugin's id of the run that submitted it
    rule: str  # from the comment, "" when the comment is not the plugin's
    workdir: str


def _rule_of(comment: str) -> str:
    if not comment.startswith("rule_"):
        return ""
    return comment[len("rule_") :].split("_wildcards_", 1)[0]


def parse_squeue(text: str) -> list[QueuedJob]:
    """The jobs in ``squeue -h -o SQUEUE_FORMAT`` output."""
    jobs = []
    for line in text.splitlines():
        fields = line.split("|", 4)
        if len(fields) == 5:
            job_id, state, run_id, comment, workdir = (field.strip() for field in fields)
            jobs.append(QueuedJob(job_id, state, run_id, _rule_of(comment), workdir))
    return jobs


def earlier_jobs(queued: Iterable[QueuedJob], workdir: str, rules: Iterable[str]) -> list[QueuedJob]:
    """The live jobs of these rules submitted from ``workdir`` (compared as real paths)."""
    here = os.path.realpath(workdir)
    names = set(rules)
    return [
        job
        for job in queued
        if job.state in LIVE_STATES and job.rule in names and os.path.realpath(job.workdir) == here
    ]


def _squeue(job_ids: Sequence[str] = ()) -> list[QueuedJob]:
    command = ["squeue", "-h", "--me", "-o", SQUEUE_FORMAT]
    if job_ids:
        command += ["-j", ",".join(job_ids)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    return parse_squeue(result.stdout) if result.returncode == 0 else []


def cancel_earlier_jobs(
    workdir: str,
    rules: Iterable[str],
    wait_s: float = 600.0,
    squeue: Callable[..., list[QueuedJob]] = _squeue,
) -> list[QueuedJob]:
    """Cancel the live jobs an earlier run of this workflow submitted, and wait until they are gone
    (their trainers save a checkpoint on the TERM). Returns the cancelled jobs."""
    found = earlier_jobs(squeue(), workdir, rules)
    if not found:
        return []
    runs = sorted({job.run_id for job in found})
    log.warning(
        "%d Slurm job(s) of an earlier run of this workflow are still queued or running (run %s): %s. "
        "Cancelling them: their trainers save a checkpoint, and this run's jobs resume from it.",
        len(found),
        ", ".join(runs),
        ", ".join(f"{job.job_id} ({job.rule}, {job.state.lower()})" for job in found),
    )
    ids = [job.job_id for job in found]
    subprocess.run(["scancel", *ids], check=False)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        left = [job for job in squeue(ids) if job.state in LIVE_STATES]
        if not left:
            return found
        time.sleep(2.0)
    raise TimeoutError(
        f"Slurm jobs {', '.join(ids)} of an earlier run did not leave the queue within {wait_s:.0f} s of scancel; "
        "check `squeue --me`, then start snakemake again"
    )
