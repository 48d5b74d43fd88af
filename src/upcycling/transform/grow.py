"""The tensor work of the second-stage transforms (upcycling.transform.methods names the methods, their
architectures and sources): the dense D1 state dict -> the initial state dict of a method.

Pure functions: state dicts (our parameter names, see model.py) and configs in, new state dicts
and configs out; no tensor is shared with the input.
"""

from __future__ import annotations

import re

import torch

from upcycling.model.flops import ModelConfig
from upcycling.transform.methods import DEPTH_INITS, Stage2Options, target_config
from upcycling.transform.upcycle import upcycle_state

_LAYER_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")
# The residual-branch outputs of a block: zero in an identity block.
_OUTPUT_PROJECTIONS = ("attn.out.weight", "ffn.down.weight")


def transform(
    dense_state: dict[str, torch.Tensor], dense_cfg: ModelConfig, method: str, options: Stage2Options, seed: int = 0
) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """Dense state dict -> (the method's initial state dict, its config). No tensor is shared with
    the input. ``seed`` draws the routers (moe_upcycle) and the split noise (grow_width)."""
    cfg = target_config(dense_cfg, method, options)
    if method == "moe_upcycle":
        return upcycle_state(
            dense_state,
            dense_cfg,
            options.experts,
            options.top_k,
            options.granularity,
            router_init_std=options.router_init_std,
            seed=seed,
            reinit_ratio=options.reinit_ratio,
        )
    if method == "continue":
        return {name: tensor.clone() for name, tensor in dense_state.items()}, cfg
    if method == "grow_depth":
        return grow_depth(dense_state, dense_cfg, options.depth_factor, options.depth_init), cfg
    generator = torch.Generator().manual_seed(seed)
    return grow_width(dense_state, dense_cfg, cfg, options.split_noise, generator), cfg


def _split_layers(
    state: dict[str, torch.Tensor], n_layers: int
) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """(tensors outside the blocks, per layer {name within the block: tensor})."""
    shared: dict[str, torch.Tensor] = {}
    layers: list[dict[str, torch.Tensor]] = [{} for _ in range(n_layers)]
    for name, tensor in state.items():
        match = _LAYER_KEY.match(name)
        if match is None:
            shared[name] = tensor
        else:
            layers[int(match.group(1))][match.group(2)] = tensor
    return shared, layers


def grow_depth(
    dense_state: dict[str, torch.Tensor], dense_cfg: ModelConfig, factor: int, init: str = "identity"
) -> dict[str, torch.Tensor]:
    """factor x n_layers layers. identity: layer i, then factor - 1 copies of it with zero output
    projections (LLaMA Pro). stack: layers 0..L-1 repeated factor times (G_stack)."""
    shared, layers = _split_layers(dense_state, dense_cfg.n_layers)
    if init == "stack":
        grown = [layers[i % dense_cfg.n_layers] for i in range(factor * dense_cfg.n_layers)]
    elif init == "identity":
        identity_copy = [
            {name: torch.zeros_like(t) if name in _OUTPUT_PROJECTIONS else t for name, t in layer.items()}
            for layer in layers
        ]
        grown = [block for layer, copy in zip(layers, identity_copy) for block in [layer] + [copy] * (factor - 1)]
    else:
        raise ValueError(f"config key 'stage2.grow_depth.init': {init!r} is not one of {', '.join(DEPTH_INITS)}")
    state = {name: tensor.clone() for name, tensor in shared.items()}
    for index, layer in enumerate(grown):
        state.update({f"blocks.{index}.{name}": tensor.clone() for name, tensor in layer.items()})
    return state


def widen(
    incoming: list[torch.Tensor],
    outgoing: torch.Tensor,
    unit_rows: int,
    new_units: int,
    split_noise: float,
    generator: torch.Generator,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Net2WiderNet on one layer: units of ``unit_rows`` rows of each incoming matrix (1 for an FFN
    unit, head_dim for a head) and as many columns of the outgoing matrix.

    New unit j copies old unit j mod n (each old unit keeps its place; the extra units go round
    the old ones, so copies are spread evenly). Its outgoing columns are the old columns / copies
    + zero-sum noise over the copies (see the module docstring)."""
    units = outgoing.shape[1] // unit_rows
    source = torch.arange(new_units) % units
    copies = torch.bincount(source, minlength=units)
    grown_in = [w.reshape(units, unit_rows, -1)[source].reshape(new_units * unit_rows, -1).clone() for w in incoming]
    out_units = outgoing.reshape(outgoing.shape[0], units, unit_rows).float()
    grown_out = out_units[:, source, :] / copies[source].view(1, -1, 1)
    if split_noise > 0:
        scale = split_noise * outgoing.float().square().mean().sqrt()
        noise = torch.randn(grown_out.shape, generator=generator) * scale
        unit_mean = torch.zeros_like(out_units).index_add_(1, source, noise) / copies.view(1, -1, 1)
        grown_out = grown_out + (noise - unit_mean[:, source, :])  # zero for a unit with one copy
    return grown_in, grown_out.reshape(outgoing.shape[0], new_units * unit_rows).to(outgoing.dtype)


def grow_width(
    dense_state: dict[str, torch.Tensor],
    dense_cfg: ModelConfig,
    grown_cfg: ModelConfig,
    split_noise: float,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """Every layer's FFN widened to grown_cfg.ffn_hidden units and attention to grown_cfg.n_heads
    heads of the same size; embeddings, norms and the residual width are unchanged."""
    if grown_cfg.head_dim != dense_cfg.head_dim or grown_cfg.d_model != dense_cfg.d_model:
        raise ValueError("grow_width keeps d_model and the head size: see target_config")
    state = {name: tensor.clone() for name, tensor in dense_state.items()}
    for layer in range(dense_cfg.n_layers):
        block = f"blocks.{layer}"
        gate, up = dense_state[f"{block}.ffn.gate_up.weight"].split(dense_cfg.ffn_hidden, dim=0)
        (gate, up), down = widen(
            [gate, up], dense_state[f"{block}.ffn.down.weight"], 1, grown_cfg.ffn_hidden, split_noise, generator
        )
        state[f"{block}.ffn.gate_up.weight"], state[f"{block}.ffn.down.weight"] = torch.cat([gate, up]), down
        q, k, v = dense_state[f"{block}.attn.qkv.weight"].split(dense_cfg.attn_width, dim=0)
        (q, k, v), out = widen(
            [q, k, v],
            dense_state[f"{block}.attn.out.weight"],
            dense_cfg.head_dim,
            grown_cfg.n_heads,
            split_noise,
            generator,
        )
        state[f"{block}.attn.qkv.weight"], state[f"{block}.attn.out.weight"] = torch.cat([q, k, v]), out
    return state
