"""Drop-Upcycling's partial re-initialisation (Nakamura et al., ICLR 2025, arXiv 2502.19261).

Each expert starts from the dense FFN with a fraction r of its intermediate units re-drawn: for
every expert independently, round(r x hidden) of its hidden indices are picked at random, and
those rows of the gate and up projections and those columns of the down projection are drawn
from a normal distribution with the mean and standard deviation of the dense matrix they come
from; the rest stays the dense weights. r = 0 is plain sparse upcycling, r = 1 a fresh FFN with
the dense model's attention. The experts then start different, so routing has something to choose
between from the first step (the paper's best setting: r = 0.5).

Pure: the draws of one expert depend only on (seed, layer, expert), so the same transform job
gives the same experts, different experts re-draw different units, and the routers' draws
(upcycle.py) do not move when r changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class DenseStats:
    """Mean and standard deviation of each dense FFN matrix: what a re-drawn unit is drawn from."""

    gate: tuple[float, float]
    up: tuple[float, float]
    down: tuple[float, float]

    @classmethod
    def of(cls, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> DenseStats:
        def moments(matrix: torch.Tensor) -> tuple[float, float]:
            values = matrix.double()
            return float(values.mean()), float(values.std())

        return cls(moments(gate), moments(up), moments(down))


def reinit_count(ratio: float, hidden: int) -> int:
    """How many of an expert's ``hidden`` units are re-drawn: Python's ``round(ratio * hidden)``,
    which rounds half to even (r = 0.5 of 5 units re-draws 2, of 7 units 4)."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"reinit_ratio {ratio} must be between 0 and 1 (config key 'sweep.reinit_ratio')")
    return round(ratio * hidden)


def expert_generator(seed: int, layer: int, expert: int) -> torch.Generator:
    """A generator of its own for one expert of one layer (a hash of the three, so nearby seeds,
    layers and experts draw unrelated streams)."""
    state = np.random.SeedSequence([seed, layer, expert]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & ((1 << 63) - 1))


def reinit_indices(hidden: int, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """The (sorted) units of one expert that are re-drawn: the generator's first draw, so the Adam
    moments of the same units can be found again from a fresh generator of the same expert."""
    return torch.randperm(hidden, generator=generator)[: reinit_count(ratio, hidden)].sort().values


def reinit_units(
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    ratio: float,
    stats: DenseStats,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One expert's (gate, up, down) with round(ratio x hidden) units re-drawn, and the indices
    re-drawn (sorted). ``gate``/``up``: hidden x d_model; ``down``: d_model x hidden. Inputs are not
    modified."""
    gate, up, down = gate.clone(), up.clone(), down.clone()
    indices = reinit_indices(gate.shape[0], ratio, generator)
    count = len(indices)
    if count == 0:
        return gate, up, down, indices

    def draw(shape: tuple[int, ...], moments: tuple[float, float], dtype: torch.dtype) -> torch.Tensor:
        mean, std = moments
        return (torch.randn(shape, generator=generator, dtype=torch.float64) * std + mean).to(dtype)

    gate[indices] = draw((count, gate.shape[1]), stats.gate, gate.dtype)
    up[indices] = draw((count, up.shape[1]), stats.up, up.dtype)
    down[:, indices] = draw((down.shape[0], count), stats.down, down.dtype)
    return gate, up, down, indices
