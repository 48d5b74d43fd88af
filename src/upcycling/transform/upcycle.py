"""Sparse upcycling (Komatsuzaki et al., arXiv 2212.05055), with granular upcycling (He et al.,
"Upcycling Large Language Models into Mixture of Experts", arXiv 2410.07524).

Every layer's SwiGLU FFN becomes E experts; attention, norms and embeddings are copied; routers
are freshly drawn. With granularity G the dense FFN's hidden units are cut into G equal slices and
E = G x m experts hold m copies of each slice: expert ``j * G + g`` is copy j of slice g.

Function preservation (tested in tests/test_upcycle.py): all experts of copy j share one router
row (a "virtual group"), so their logits tie and top-k with k = G x k' picks whole groups. The
top-k gate weights are renormalised to sum to 1 over the k chosen experts, so the G slices of a
group together get weight 1/G of their group's share; scaling every expert's down projection by G
restores the dense output exactly. With top-1 gating DeepSpeed scales the expert output by the
(unnormalised) gate probability, so the upcycled model starts as p * FFN(x), not FFN(x).
"""

from __future__ import annotations

import torch

from upcycling.model.flops import ModelConfig
from upcycling.model.transformer import expert_weight_name, router_weight_name
from upcycling.transform.methods import moe_config


def router_weights(cfg: ModelConfig, std: float, generator: torch.Generator) -> torch.Tensor:
    """One router (experts x d_model): a draw per virtual group, shared by its G slices."""
    groups = cfg.experts // cfg.granularity
    group_rows = torch.randn(groups, cfg.d_model, generator=generator) * std
    return group_rows.repeat_interleave(cfg.granularity, dim=0)


def _expand_ffns(
    dense_state: dict[str, torch.Tensor], cfg: ModelConfig, down_scale: float, router: callable
) -> dict[str, torch.Tensor]:
    """Copy every non-FFN tensor; turn each dense FFN into cfg.experts expert slices."""
    granularity, slice_hidden = cfg.granularity, cfg.expert_hidden
    moe_state = {name: tensor.clone() for name, tensor in dense_state.items() if ".ffn." not in name}
    for layer in range(cfg.n_layers):
        dense_ffn = f"blocks.{layer}.ffn"
        gate, up = dense_state[f"{dense_ffn}.gate_up.weight"].split(cfg.ffn_hidden, dim=0)
        down = dense_state[f"{dense_ffn}.down.weight"]
        moe_state[router_weight_name(layer)] = router().to(down.dtype)
        for expert in range(cfg.experts):
            hidden = slice((expert % granularity) * slice_hidden, (expert % granularity + 1) * slice_hidden)
            moe_state[expert_weight_name(layer, expert, "gate_up.weight")] = torch.cat(
                [gate[hidden], up[hidden]]
            ).clone()
            moe_state[expert_weight_name(layer, expert, "down.weight")] = (down[:, hidden] * down_scale).clone()
    return moe_state


def upcycle_state(
    dense_state: dict[str, torch.Tensor],
    dense_cfg: ModelConfig,
    experts: int,
    top_k: int,
    granularity: int = 1,
    router_init_std: float = 0.02,
    seed: int = 0,
) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """Dense state dict (our names, see model.py) -> the upcycled MoE's state dict and config."""
    cfg = moe_config(dense_cfg, experts, top_k, granularity)
    generator = torch.Generator().manual_seed(seed)
    return _expand_ffns(dense_state, cfg, granularity, lambda: router_weights(cfg, router_init_std, generator)), cfg


def upcycle_adam_moments(
    exp_avg: dict[str, torch.Tensor], exp_avg_sq: dict[str, torch.Tensor], moe_cfg: ModelConfig
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The dense Adam moments mapped like the weights. The down projections are scaled by G, so
    their first moments scale by G and second moments by G^2; fresh routers start at zero."""
    granularity = moe_cfg.granularity

    def zeros():
        return torch.zeros(moe_cfg.experts, moe_cfg.d_model)

    return (
        _expand_ffns(exp_avg, moe_cfg, granularity, zeros),
        _expand_ffns(exp_avg_sq, moe_cfg, granularity**2, zeros),
    )
