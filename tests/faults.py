"""Failure injection for the trainer's tests: hooks that `upcycling train` installs when
UPCYCLING_HOOKS names them (e.g. ``faults:signal_at_step``), configured by their own variables.
Nothing here runs unless a test asks for it."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import time
from pathlib import Path

import torch

SIGNAL_AT_STEP = "UPCYCLING_TEST_SIGNAL_AT_STEP"  # SIGUSR1 to the trainer after this step
SIGNAL_NAME = "UPCYCLING_TEST_SIGNAL"  # which signal signal_at_step sends (default SIGUSR1), e.g. SIGINT
NAN_AT_STEP = "UPCYCLING_TEST_NAN_AT_STEP"  # this step's loss is NaN (a weight is poisoned before it)
DISK_FULL_AT_STEP = "UPCYCLING_TEST_DISK_FULL_AT_STEP"  # checkpoint saves after this step meet a full disk
SLOW_FIRST_ATTEMPT = "UPCYCLING_TEST_SLOW_FIRST_ATTEMPT"  # a marker file: the attempt that creates it is slow
SLOW_STEP_SECONDS = 0.2
SIGNALS_AFTER_FILE = "UPCYCLING_TEST_SIGNALS_AFTER_FILE"  # from when this file appears, SIGUSR1 until the trainer exits


def signal_at_step():
    step_to_signal = int(os.environ[SIGNAL_AT_STEP])
    sent = signal.Signals[os.environ.get(SIGNAL_NAME, "SIGUSR1")]

    def hook(step, tokens, engine):
        if step == step_to_signal:
            os.kill(os.getpid(), sent)

    return hook


def signals_after_file():
    """From when the file SIGNALS_AFTER_FILE names appears (a run's metrics: its outputs are written)
    until the trainer exits, a SIGUSR1 every few milliseconds: a Slurm warning that lands as the
    process shuts down. A shell outside the trainer sends them, since Python stops its own threads
    before it exits."""
    watched = os.environ[SIGNALS_AFTER_FILE]
    watcher = []

    def hook(step, tokens, engine):
        if not watcher:
            # Both loops end with the trainer (kill -0 fails), whether or not the file ever appears.
            script = (
                'while [ ! -e "$1" ]; do kill -0 "$2" 2>/dev/null || exit 0; sleep 0.01; done; '
                'while kill -USR1 "$2" 2>/dev/null; do sleep 0.002; done'
            )
            command = ["sh", "-c", script, "sh", watched, str(os.getpid())]
            watcher.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    return hook


def nan_at_step():
    poisoned_step = int(os.environ[NAN_AT_STEP])

    def hook(step, tokens, engine):
        if step == poisoned_step - 1:
            with torch.no_grad():
                next(engine.module.parameters()).fill_(math.nan)

    return hook


def disk_full_at_step():
    """From this step on, torch.save writes part of its file and fails as torch's zip writer does
    when the disk fills up (the message never says "no space")."""
    full_from = int(os.environ[DISK_FULL_AT_STEP])
    save = torch.save

    def save_onto_a_full_disk(obj, path, *args, **kwargs):
        with open(path, "wb") as stream:
            stream.write(b"PK\x03\x04" + b"\0" * 4096)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4480 vs 4376")

    def hook(step, tokens, engine):
        torch.save = save_onto_a_full_disk if step >= full_from else save

    return hook


def slow_first_attempt():
    """The first attempt of a run (the one that creates the marker file) sleeps SLOW_STEP_SECONDS after
    each step, as on a slow or overloaded node, so it cannot finish inside a short time limit; the
    attempts after it train at full speed."""
    marker = Path(os.environ[SLOW_FIRST_ATTEMPT])
    first = not marker.exists()
    marker.touch()

    def hook(step, tokens, engine):
        if first:
            time.sleep(SLOW_STEP_SECONDS)

    return hook


def slow_first_attempt_env(marker: Path) -> dict[str, str]:
    """Environment of a run whose first attempt (the one that creates marker) is slow_first_attempt's."""
    return {"UPCYCLING_HOOKS": "faults:slow_first_attempt", SLOW_FIRST_ATTEMPT: str(marker)}


def env(**hooks: int) -> dict[str, str]:
    """Environment of a CLI run with these hooks: env(signal_at_step=5, nan_at_step=3)."""
    variables = {"signal_at_step": SIGNAL_AT_STEP, "nan_at_step": NAN_AT_STEP, "disk_full_at_step": DISK_FULL_AT_STEP}
    result = {"UPCYCLING_HOOKS": ",".join(f"faults:{name}" for name in hooks)}
    result.update({variables[name]: str(step) for name, step in hooks.items()})
    return result
