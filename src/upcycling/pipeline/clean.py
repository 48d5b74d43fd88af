"""`upcycling clean`: delete the DeepSpeed checkpoints that no job of the sweep will read.

Under ``<results>/checkpoints/``: checkpoints moved aside (``*.stale-*``), in-progress checkpoints
of jobs that have finished or that the sweep no longer has, and stable checkpoints that every job
reading them has consumed (Snakemake deletes those itself, temp(), unless
``training.keep_stable_checkpoints``; a run stopped half-way leaves them) or that no job of the
sweep names. Checkpoints that a job will still resume from or start from are kept.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from upcycling.core.spec import FromCheckpoint
from upcycling.pipeline.jobs import Inventory

log = logging.getLogger(__name__)


def _size(path: Path) -> int:
    return sum(item.stat().st_size for item in path.rglob("*") if item.is_file())


def _done(outputs) -> bool:
    return all(Path(path).exists() for path in outputs)


def removable(inventory: Inventory) -> list[tuple[Path, str]]:
    """(checkpoint directory, why it can go) for everything clean deletes."""
    root = inventory.sweep.results_dir / "checkpoints"
    if not root.is_dir():
        return []
    training = [job for job in inventory.jobs if job.phase is not None]
    results = inventory.sweep.results_dir  # a spec's paths start there
    partials = {results / job.train_spec.partial: job for job in training}
    stables = {Path(job.outputs["checkpoint"]): job for job in training if job.phase == "stable"}
    readers: dict[Path, list] = {path: [] for path in stables}
    for job in training:
        start = job.train_spec.start
        if isinstance(start, FromCheckpoint):
            readers[results / start.path].append(job)
    found = []
    for directory in sorted(
        path for path in root.rglob("*") if path.is_dir() and path.name.startswith(("stable_", "d_", "d1_", "d2_"))
    ):
        if ".stale-" in directory.name:
            found.append((directory, "moved aside by a rerun"))
        elif directory in partials:
            if _done(partials[directory].outputs.values()):
                found.append((directory, f"{partials[directory].label} has finished"))
        elif directory in stables:
            if (
                not inventory.sweep.training.keep_stable_checkpoints
                and readers[directory]
                and all(_done(reader.outputs.values()) for reader in readers[directory])
            ):
                found.append((directory, "every job that reads it has finished"))
        else:
            found.append((directory, "no job of this sweep reads or writes it"))
    return found


def clean(inventory: Inventory, dry_run: bool = False) -> int:
    """Delete what :func:`removable` lists; returns the bytes freed (or that would be)."""
    freed = 0
    for directory, why in removable(inventory):
        size = _size(directory)
        freed += size
        log.info("%s %s (%.3g GB): %s", "would delete" if dry_run else "deleting", directory, size / 1e9, why)
        if not dry_run:
            shutil.rmtree(directory)
    return freed
