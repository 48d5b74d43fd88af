"""The learning-rate schedules (pure): warmup-stable-decay, whose stable jobs chain into one long
run, and cosine."""

from __future__ import annotations

import pytest

from upcycling.train.schedule import Schedule


def test_wsd_schedule_warms_up_holds_and_decays_linearly():
    schedule = Schedule(peak_lr=1e-3, warmup_tokens=100, min_lr_ratio=0.1, kind="wsd", decay_start=800, decay_end=1000)
    assert schedule.lr_at(0) == pytest.approx(1e-5)
    assert schedule.lr_at(99) == pytest.approx(1e-3)
    assert schedule.lr_at(500) == schedule.lr_at(799) == 1e-3
    assert schedule.lr_at(900) == pytest.approx(0.55e-3)
    assert schedule.lr_at(1000) == pytest.approx(1e-4)
    # A stable job (no decay) follows the same curve up to the decay: chains equal one long run.
    stable = Schedule(peak_lr=1e-3, warmup_tokens=100, min_lr_ratio=0.1, kind="wsd", decay_start=None, decay_end=None)
    assert all(stable.lr_at(t) == schedule.lr_at(t) for t in range(0, 800, 37))


def test_cosine_schedule_ends_at_min_lr():
    schedule = Schedule(
        peak_lr=1e-3, warmup_tokens=0, min_lr_ratio=0.1, kind="cosine", decay_start=None, decay_end=1000
    )
    assert schedule.lr_at(0) == pytest.approx(1e-3)
    assert schedule.lr_at(500) == pytest.approx(0.55e-3)
    assert schedule.lr_at(1000) == pytest.approx(1e-4)
