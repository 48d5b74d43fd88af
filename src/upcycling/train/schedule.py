"""The learning rate as a pure function of the tokens a run has seen.

Because the rate depends on nothing else, a chain of WSD stable jobs (stable to D_1, continued to
D_2, ...) is the same run as one long job, and each budget's decay job branches from the stable
checkpoint at D x (1 - decay_fraction).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from upcycling.core.spec import TrainingSettings


@dataclass(frozen=True)
class Schedule:
    peak_lr: float
    warmup_tokens: int
    min_lr_ratio: float
    kind: str  # "wsd" | "cosine"
    decay_start: int | None  # WSD: where the decay begins (None: a stable job, no decay)
    decay_end: int | None  # WSD and cosine: the run's total tokens D

    def __post_init__(self) -> None:
        if self.decay_end is None and (self.kind == "cosine" or self.decay_start is not None):
            raise ValueError(f"a {self.kind} schedule that decays needs decay_end (the run's total tokens)")

    def lr_at(self, tokens: int) -> float:
        if self.warmup_tokens and tokens < self.warmup_tokens:
            return self.peak_lr * (tokens + 1) / self.warmup_tokens
        min_lr = self.peak_lr * self.min_lr_ratio
        if self.kind == "cosine":
            span = max((self.decay_end or 0) - self.warmup_tokens, 1)
            progress = min(max(tokens - self.warmup_tokens, 0) / span, 1.0)
            return min_lr + (self.peak_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
        if self.decay_start is None or tokens < self.decay_start:
            return self.peak_lr
        progress = min((tokens - self.decay_start) / max((self.decay_end or 0) - self.decay_start, 1), 1.0)
        return self.peak_lr + (min_lr - self.peak_lr) * progress  # linear decay to min_lr

    @classmethod
    def of_job(cls, training: TrainingSettings, decay: tuple[int | None, int] | None) -> Schedule:
        """From a job spec's training settings and its decay ``(start, end)`` (None: a stable job)."""
        start, end = decay if decay is not None else (None, None)
        return cls(
            peak_lr=training.lr,
            warmup_tokens=training.warmup_tokens,
            min_lr_ratio=training.min_lr_ratio,
            kind=training.schedule,
            decay_start=start,
            decay_end=end,
        )
