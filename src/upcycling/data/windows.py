"""Training and evaluation batches: random windows of seq_len + 1 tokens from the token stream.

The windows of step s come from a generator seeded by (seed, s), so the data position is the step
number: a resumed run sees exactly the batches an uninterrupted run would, with no sampler state
to save. Every rank draws the same global batch and takes its own rows, so one process with batch
B and two processes with B/2 each train on the same tokens.

The stream is the tokens stage's shards read as one sequence (``TokenStream``): a window may span
two shards, and since the shards concatenated are the one-shard stream, the batches do not depend
on how many shards the corpus was tokenized in.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from upcycling.core.errors import InputError

IGNORE_INDEX = -100


class TokenStream:
    """Arrays of token ids (memmaps, in practice) read as one sequence, without copying them."""

    def __init__(self, parts: Sequence[np.ndarray], vocab_size: int | None = None):
        self.parts = [part for part in parts if len(part)]
        self.offsets = np.cumsum([0] + [len(part) for part in self.parts])  # where each part starts
        self.vocab_size = vocab_size  # every window read is checked against it (None: unchecked)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read(self, begin: int, end: int) -> np.ndarray:
        """Ids begin..end-1 of the stream (a view when they lie in one part)."""
        if not 0 <= begin <= end <= len(self):
            raise IndexError(f"ids {begin}..{end} of a stream of {len(self)}")
        if begin == end:
            return np.empty(0, dtype=self.parts[0].dtype if self.parts else np.int64)
        part = int(np.searchsorted(self.offsets, begin, side="right")) - 1
        pieces = []
        while begin < end:
            offset = begin - int(self.offsets[part])
            take = min(end, int(self.offsets[part + 1])) - begin
            pieces.append(self.parts[part][offset : offset + take])
            begin += take
            part += 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """[len(starts), length] int64: the ids from each start on."""
        if len(self.parts) == 1:  # one gather instead of a loop
            out = self.parts[0][np.asarray(starts)[:, None] + np.arange(length)].astype(np.int64)
        else:
            out = np.empty((len(starts), length), dtype=np.int64)
            for row, start in enumerate(starts):
                out[row] = self.read(int(start), int(start) + length)
        if self.vocab_size is not None and out.size and int(out.max()) >= self.vocab_size:
            # Cheap next to a training step, and an id past the embedding is an IndexError on the
            # CPU and a device-side assert on a GPU: say which ids, not where the model broke.
            raise InputError(
                f"the token files hold id {int(out.max())}, not below meta.json's vocab_size {self.vocab_size} "
                "(a token file changed after it was written, or meta.json was edited): delete the tokens "
                "directory and re-run the tokens stage"
            )
        return out


class TokenWindows:
    def __init__(self, tokens: np.ndarray | TokenStream, seq_len: int):
        self.tokens = tokens if isinstance(tokens, TokenStream) else TokenStream([tokens])
        if len(self.tokens) < seq_len + 2:
            raise ValueError(
                f"{len(self.tokens)} tokens cannot fill one window of seq_len+1={seq_len + 1}: "
                "lower data.seq_len or add text to the corpus"
            )
        self.seq_len = seq_len

    def _stack(self, starts: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(self.tokens.windows(starts, self.seq_len + 1))

    def train_batch(
        self, seed: int, step: int, global_rows: int, row_slice: slice, valid_tokens: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows of step `step`. valid_tokens < global_rows*seq_len masks the tail, so a
        run's last step trains on exactly the tokens left in its budget."""
        rng = np.random.default_rng([seed, step])
        starts = rng.integers(0, len(self.tokens) - self.seq_len - 1, size=global_rows)
        rows = np.arange(global_rows)[row_slice]  # only this rank's windows are read
        windows = self._stack(starts[rows])
        inputs, targets = windows[:, :-1], windows[:, 1:].clone()
        if valid_tokens is not None:
            # Position of each target in the flattened global batch; the tail past valid_tokens is masked.
            flat = torch.from_numpy(rows)[:, None] * self.seq_len + torch.arange(self.seq_len)
            targets[flat >= valid_tokens] = IGNORE_INDEX
        return inputs.contiguous(), targets.contiguous()

    def eval_windows(self, n_windows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Fixed, evenly spaced held-out windows: identical at every evaluation of every run."""
        last_start = len(self.tokens) - self.seq_len - 1
        starts = np.linspace(0, last_start, num=n_windows).astype(np.int64)
        windows = self._stack(starts)
        return windows[:, :-1], windows[:, 1:]
