"""Sparse upcycling (Komatsuzaki et al., arXiv 2212.05055), with granular upcycling (He et al.,
"Upcycling Large Language Models into Mixture of Experts", arXiv 2410.07524).

Every layer's SwiGLU FFN becomes E experts; attention, norms and embeddings are copied; routers
are freshly drawn. With granularity G the dense FFN's hidden units are cut into G equal slices and
E = G x m experts hold m copies of each slice: expert ``j * G + g`` is copy j of slice g.

Function preservation (tested in tests/unit/test_upcycle.py): all experts of copy j share one router
row (a "virtual group"), so their logits tie and top-k with k = G x k' picks whole groups. The
top-k gate weights are renormalised to sum to 1 over the k chosen experts, so the G slices of a
group together get weight 1/G of their group's share; scaling every expert's down projection by G
restores the dense output exactly. With top-1 gating DeepSpeed scales the expert output by the
(unnormalised) gate probability, so the upcycled model starts as p * FFN(x), not FFN(x).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from upcycling.model.flops import ModelConfig
from upcycling.model.transformer import expert_weight_name, router_weight_name
from upcycling.transform.methods import moe_config
from upcycling.transform.reinit import DenseStats, expert_generator, reinit_indices, reinit_units


def router_weights(cfg: ModelConfig, std: float, generator: torch.Generator) -> torch.Tensor:
    """One router (experts x d_model): a draw per virtual group, shared by its G slices."""
    groups = cfg.experts // cfg.granularity
    group_rows = torch.randn(groups, cfg.d_model, generator=generator) * std
    return group_rows.repeat_interleave(cfg.granularity, dim=0)


# One expert's (gate, up, down) slices -> what it starts with: the re-initialisation of
# Drop-Upcycling for the weights, zeroed moments of the same units for Adam's state.
ExpertSlices = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
Redraw = Callable[[int, int, ExpertSlices], ExpertSlices]


def _dense_ffn(dense_state: dict[str, torch.Tensor], cfg: ModelConfig, layer: int) -> ExpertSlices:
    """One layer's dense (gate, up, down): hidden x d_model, hidden x d_model, d_model x hidden."""
    gate, up = dense_state[f"blocks.{layer}.ffn.gate_up.weight"].split(cfg.ffn_hidden, dim=0)
    return gate, up, dense_state[f"blocks.{layer}.ffn.down.weight"]


def _expand_ffns(
    dense_state: dict[str, torch.Tensor],
    cfg: ModelConfig,
    down_scale: float,
    router: Callable[[], torch.Tensor],
    redraw: Redraw | None = None,
) -> dict[str, torch.Tensor]:
    """Copy every non-FFN tensor; turn each dense FFN into cfg.experts expert slices. ``redraw``
    (layer, expert, slices) changes an expert's slices before its down projection is scaled."""
    granularity, slice_hidden = cfg.granularity, cfg.expert_hidden
    moe_state = {name: tensor.clone() for name, tensor in dense_state.items() if ".ffn." not in name}
    for layer in range(cfg.n_layers):
        gate, up, down = _dense_ffn(dense_state, cfg, layer)
        moe_state[router_weight_name(layer)] = router().to(down.dtype)
        for expert in range(cfg.experts):
            hidden = slice((expert % granularity) * slice_hidden, (expert % granularity + 1) * slice_hidden)
            slices = (gate[hidden], up[hidden], down[:, hidden])
            if redraw is not None:
                slices = redraw(layer, expert, slices)
            expert_gate, expert_up, expert_down = slices
            moe_state[expert_weight_name(layer, expert, "gate_up.weight")] = torch.cat([expert_gate, expert_up]).clone()
            moe_state[expert_weight_name(layer, expert, "down.weight")] = (expert_down * down_scale).clone()
    return moe_state


def upcycle_state(
    dense_state: dict[str, torch.Tensor],
    dense_cfg: ModelConfig,
    experts: int,
    top_k: int,
    granularity: int = 1,
    router_init_std: float = 0.02,
    seed: int = 0,
    reinit_ratio: float = 0.0,
) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """Dense state dict (our names, see model.py) -> the upcycled MoE's state dict and config.

    ``reinit_ratio`` r > 0: Drop-Upcycling (upcycling.transform.reinit): each expert re-draws
    round(r x its hidden units) from the statistics of its layer's dense matrices, with a generator
    of its own (seed, layer, expert), so the routers' draws are the same whatever r."""
    cfg = moe_config(dense_cfg, experts, top_k, granularity)
    generator = torch.Generator().manual_seed(seed)
    redraw: Redraw | None = None
    if reinit_ratio > 0:
        stats = [DenseStats.of(*_dense_ffn(dense_state, cfg, layer)) for layer in range(cfg.n_layers)]

        def reinitialised(layer: int, expert: int, slices: ExpertSlices) -> ExpertSlices:
            gate, up, down, _ = reinit_units(*slices, reinit_ratio, stats[layer], expert_generator(seed, layer, expert))
            return gate, up, down

        redraw = reinitialised
    return _expand_ffns(
        dense_state, cfg, granularity, lambda: router_weights(cfg, router_init_std, generator), redraw
    ), cfg


def upcycle_adam_moments(
    exp_avg: dict[str, torch.Tensor],
    exp_avg_sq: dict[str, torch.Tensor],
    moe_cfg: ModelConfig,
    reinit_ratio: float = 0.0,
    seed: int = 0,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The dense Adam moments mapped like the weights. The down projections are scaled by G, so
    their first moments scale by G and second moments by G^2; fresh routers start at zero, and so
    do the units Drop-Upcycling re-drew (``reinit_ratio`` and ``seed`` as given to upcycle_state:
    the same units), whose dense moments belong to weights they no longer have."""
    granularity = moe_cfg.granularity

    def zeros():
        return torch.zeros(moe_cfg.experts, moe_cfg.d_model)

    redraw: Redraw | None = None
    if reinit_ratio > 0:

        def zeroed(layer: int, expert: int, slices: ExpertSlices) -> ExpertSlices:
            gate, up, down = (tensor.clone() for tensor in slices)
            units = reinit_indices(gate.shape[0], reinit_ratio, expert_generator(seed, layer, expert))
            gate[units], up[units], down[:, units] = 0.0, 0.0, 0.0
            return gate, up, down

        redraw = zeroed
    return (
        _expand_ffns(exp_avg, moe_cfg, granularity, zeros, redraw),
        _expand_ffns(exp_avg_sq, moe_cfg, granularity**2, zeros, redraw),
    )
