"""Training and evaluation batches: random windows of seq_len + 1 tokens from the token memmaps.

The windows of step s come from a generator seeded by (seed, s), so the data position is the step
number: a resumed run sees exactly the batches an uninterrupted run would, with no sampler state
to save. Every rank draws the same global batch and takes its own rows, so one process with batch
B and two processes with B/2 each train on the same tokens.
"""

from __future__ import annotations

import numpy as np
import torch

IGNORE_INDEX = -100


class TokenWindows:
    def __init__(self, tokens: np.ndarray, seq_len: int):
        if len(tokens) < seq_len + 2:
            raise ValueError(f"{len(tokens)} tokens cannot fill one window of seq_len+1={seq_len + 1}: "
                             "lower data.seq_len or add text to the corpus")
        self.tokens = tokens
        self.seq_len = seq_len

    def _stack(self, starts: np.ndarray) -> torch.Tensor:
        offsets = np.arange(self.seq_len + 1)
        return torch.from_numpy(self.tokens[starts[:, None] + offsets].astype(np.int64))

    def train_batch(self, seed: int, step: int, global_rows: int, row_slice: slice,
                    valid_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows of step `step`. valid_tokens < global_rows*seq_len masks the tail, so a
        run's last step trains on exactly the tokens left in its budget."""
        rng = np.random.default_rng([seed, step])
        starts = rng.integers(0, len(self.tokens) - self.seq_len - 1, size=global_rows)
        windows = self._stack(starts)
        inputs, targets = windows[:, :-1], windows[:, 1:].clone()
        if valid_tokens is not None:
            flat = targets.view(-1)
            flat[valid_tokens:] = IGNORE_INDEX
        return inputs[row_slice].contiguous(), targets[row_slice].contiguous()

    def eval_windows(self, n_windows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Fixed, evenly spaced held-out windows: identical at every evaluation of every run."""
        last_start = len(self.tokens) - self.seq_len - 1
        starts = np.linspace(0, last_start, num=n_windows).astype(np.int64)
        windows = self._stack(starts)
        return windows[:, :-1], windows[:, 1:]
