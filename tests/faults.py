"""Failure injection for the trainer's tests: hooks that `upcycling train` installs when
UPCYCLING_HOOKS names them (e.g. ``faults:signal_at_step``), configured by their own variables.
Nothing here runs unless a test asks for it."""

from __future__ import annotations

import math
import os
import signal

import torch

SIGNAL_AT_STEP = "UPCYCLING_TEST_SIGNAL_AT_STEP"  # SIGUSR1 to the trainer after this step
NAN_AT_STEP = "UPCYCLING_TEST_NAN_AT_STEP"  # this step's loss is NaN (a weight is poisoned before it)


def signal_at_step():
    step_to_signal = int(os.environ[SIGNAL_AT_STEP])

    def hook(step, tokens, engine):
        if step == step_to_signal:
            os.kill(os.getpid(), signal.SIGUSR1)

    return hook


def nan_at_step():
    poisoned_step = int(os.environ[NAN_AT_STEP])

    def hook(step, tokens, engine):
        if step == poisoned_step - 1:
            with torch.no_grad():
                next(engine.module.parameters()).fill_(math.nan)

    return hook


def env(**hooks: int) -> dict[str, str]:
    """Environment of a CLI run with these hooks: env(signal_at_step=5, nan_at_step=3)."""
    variables = {"signal_at_step": SIGNAL_AT_STEP, "nan_at_step": NAN_AT_STEP}
    result = {"UPCYCLING_HOOKS": ",".join(f"faults:{name}" for name in hooks)}
    result.update({variables[name]: str(step) for name, step in hooks.items()})
    return result
