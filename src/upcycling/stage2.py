"""Second-stage transforms: the dense D1 model -> the initial model of a second-stage method.

Every method starts from the dense export of D1 tokens and is then trained over the D2 grid
(Liew & Kato, "From Acceleration to Saturation", arXiv 2510.06548, fit the same D1/D2 law to each):

- ``moe_upcycle``: sparse upcycling into an MoE (delegated to ``upcycle.py``).
- ``continue``: the same dense model, unchanged; the D2 stage continues pretraining it, on the
  first corpus or on ``stage2.corpus`` (a domain shift). The transform is the identity.
- ``grow_depth``: ``factor`` x as many layers.
  ``init: identity`` (default) is LLaMA Pro's block expansion (Wu et al., arXiv 2401.02415): each
  layer is followed by factor - 1 copies of itself whose attention and FFN output projections
  are zero, so each copy adds nothing to the residual stream and the model's function is
  unchanged. ``init: stack`` is G_stack (Du et al., arXiv 2405.15319), the growth Liew & Kato
  use: the whole stack of layers repeated ``factor`` times; it does not preserve the function.
- ``grow_width``: Net2WiderNet (Chen, Goodfellow, Shlens, arXiv 1511.05641) applied to the FFN's
  hidden units and to the attention heads (head size and d_model unchanged, so a grown model has
  n_heads x head_dim > d_model). A new unit copies an old unit's incoming weights (gate and up
  rows; a head's q, k and v rows) and the copies of one unit share its outgoing weights (down
  projection columns; the head's output projection columns), so the function is unchanged.

Symmetry: exact copies that split their outgoing weights equally get identical gradients forever
(their incoming gradients are the outgoing column times the same upstream gradient), so they
never become different units. Each copy's outgoing weights are therefore old / n + noise, with
random noise that sums to zero over the n copies of a unit (``split_noise`` x the RMS of that
weight matrix): the sum, hence the function, is exact, and the copies' gradients point in
different directions from the first step (tested in tests/test_stage2.py).

All functions here are pure: state dicts (our parameter names, see model.py) and configs in,
new state dicts and configs out. ``upcycling transform`` is the I/O edge (cli.py).
"""

from __future__ import annotations

import dataclasses
import math
import re

import torch

from .flops import ModelConfig
from .upcycle import moe_config, upcycle_state

METHODS = ("moe_upcycle", "continue", "grow_depth", "grow_width")
DEPTH_INITS = ("identity", "stack")
_LAYER_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")
# The residual-branch outputs of a block: zero in an identity block.
_OUTPUT_PROJECTIONS = ("attn.out.weight", "ffn.down.weight")


@dataclasses.dataclass(frozen=True)
class Stage2Options:
    """Everything a transform needs besides the dense model; defaults match the config schema."""

    # moe_upcycle: the sweep's E, k and G of the job, and moe.router_init_std
    experts: int = 0
    top_k: int = 0
    granularity: int = 1
    router_init_std: float = 0.02
    # grow_depth (stage2.grow_depth)
    depth_factor: int = 2
    depth_init: str = "identity"
    # grow_width (stage2.grow_width)
    ffn_factor: float = 2.0
    heads_factor: float = 2.0
    split_noise: float = 0.01


def options_from_config(sweep_cfg: dict, experts: int = 0, top_k: int = 0, granularity: int = 1) -> Stage2Options:
    """The options of a validated sweep config (its ``stage2`` and ``moe`` sections) for one job."""
    stage2 = sweep_cfg.get("stage2") or {}
    depth, width = stage2.get("grow_depth") or {}, stage2.get("grow_width") or {}
    defaults = Stage2Options()
    return Stage2Options(
        experts=experts, top_k=top_k, granularity=granularity,
        router_init_std=sweep_cfg.get("moe", {}).get("router_init_std", defaults.router_init_std),
        depth_factor=depth.get("factor", defaults.depth_factor),
        depth_init=depth.get("init", defaults.depth_init),
        ffn_factor=width.get("ffn_factor", defaults.ffn_factor),
        heads_factor=width.get("heads_factor", defaults.heads_factor),
        split_noise=width.get("split_noise", defaults.split_noise),
    )


def check_config(sweep_cfg: dict) -> None:
    """ConfigError where a growth in ``stage2.methods`` does not fit a dense model of the config
    (a factor giving fractional units, heads that transformers cannot load), for the checks at DAG
    build. moe_upcycle is left to the sweep's E/k/G checks."""
    from .config import ConfigError

    options = options_from_config(sweep_cfg)
    methods = [m for m in (sweep_cfg.get("stage2") or {}).get("methods", ["moe_upcycle"]) if m != "moe_upcycle"]
    for label, dims in sweep_cfg["dense_models"].items():
        dense = ModelConfig(vocab_size=1, d_model=dims["d_model"], n_layers=dims["n_layers"], n_heads=dims["n_heads"],
                            ffn_hidden=dims["ffn_hidden"], seq_len=sweep_cfg["data"]["seq_len"])
        for method in methods:
            try:
                target_config(dense, method, options)
            except ValueError as exc:
                raise ConfigError(f"stage2 method {method} on dense model '{label}': {exc}") from exc


def describe(method: str, options: Stage2Options) -> dict:
    """The options that shaped a method's initial model, for the export's provenance."""
    relevant = {
        "moe_upcycle": ("experts", "top_k", "granularity", "router_init_std"),
        "continue": (),
        "grow_depth": ("depth_factor", "depth_init"),
        "grow_width": ("ffn_factor", "heads_factor", "split_noise"),
    }[_checked_method(method)]
    return {"stage2_method": method, **{name: getattr(options, name) for name in relevant}}


def _checked_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown second-stage method {method!r}: pick one of {', '.join(METHODS)} "
                         "(config key 'stage2.methods')")
    return method


def _grown(count: int, factor: float, what: str, key: str) -> int:
    """count x factor, which must be a whole number (a model has no fractional heads or units)."""
    grown = count * factor
    if not math.isclose(grown, round(grown), abs_tol=1e-9):
        raise ValueError(f"config key '{key}': {count} {what} x {factor} = {grown:g} is not a whole number: "
                         f"pick a factor that makes it one (a multiple of 1/{count})")
    return round(grown)


def target_config(dense_cfg: ModelConfig, method: str, options: Stage2Options) -> ModelConfig:
    """The architecture a method trains over D2 (also that of its from-scratch baseline)."""
    _checked_method(method)
    if dense_cfg.is_moe:
        raise ValueError("second-stage transforms start from a dense checkpoint, got an MoE (num_local_experts > 1)")
    if method == "moe_upcycle":
        if options.experts < 2:
            raise ValueError(f"moe_upcycle needs at least 2 experts, got experts={options.experts}: "
                             "give the job's E and k (config keys 'sweep.experts', 'sweep.top_k')")
        return moe_config(dense_cfg, options.experts, options.top_k, options.granularity)
    if method == "continue":
        return dense_cfg
    if method == "grow_depth":
        if options.depth_init not in DEPTH_INITS:
            raise ValueError(f"config key 'stage2.grow_depth.init': {options.depth_init!r} is not one of "
                             f"{', '.join(DEPTH_INITS)}")
        if not (isinstance(options.depth_factor, int) and options.depth_factor >= 2):
            raise ValueError(f"config key 'stage2.grow_depth.factor': {options.depth_factor!r} must be a whole "
                             "number >= 2 (the grown model has factor x n_layers layers)")
        return dataclasses.replace(dense_cfg, n_layers=dense_cfg.n_layers * options.depth_factor)
    # grow_width
    if options.ffn_factor < 1 or options.heads_factor < 1 or (options.ffn_factor, options.heads_factor) == (1, 1):
        raise ValueError(f"config keys 'stage2.grow_width.ffn_factor' / 'heads_factor' "
                         f"({options.ffn_factor}, {options.heads_factor}): each must be >= 1 and one above 1; "
                         "a model that does not grow is method 'continue'")
    if options.split_noise < 0:
        raise ValueError(f"config key 'stage2.grow_width.split_noise': {options.split_noise} must be >= 0")
    n_heads = _grown(dense_cfg.n_heads, options.heads_factor, "heads", "stage2.grow_width.heads_factor")
    if dense_cfg.d_model % n_heads:
        # Not a limit of our model: transformers' LlamaConfig refuses it even with an explicit head_dim.
        raise ValueError(f"config key 'stage2.grow_width.heads_factor': {n_heads} heads do not divide "
                         f"d_model={dense_cfg.d_model}, and transformers cannot load such a Llama export: "
                         "pick a factor that gives a divisor of d_model (2 always does)")
    return dataclasses.replace(
        dense_cfg,
        ffn_hidden=_grown(dense_cfg.ffn_hidden, options.ffn_factor, "FFN hidden units", "stage2.grow_width.ffn_factor"),
        n_heads=n_heads,
        explicit_head_dim=dense_cfg.head_dim if n_heads != dense_cfg.n_heads else dense_cfg.explicit_head_dim,
    )


def transform(dense_state: dict[str, torch.Tensor], dense_cfg: ModelConfig, method: str,
              options: Stage2Options, seed: int = 0) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """Dense state dict -> (the method's initial state dict, its config). No tensor is shared with
    the input. ``seed`` draws the routers (moe_upcycle) and the split noise (grow_width)."""
    cfg = target_config(dense_cfg, method, options)
    if method == "moe_upcycle":
        return upcycle_state(dense_state, dense_cfg, options.experts, options.top_k, options.granularity,
                             router_init_std=options.router_init_std, seed=seed)
    if method == "continue":
        return {name: tensor.clone() for name, tensor in dense_state.items()}, cfg
    if method == "grow_depth":
        return grow_depth(dense_state, dense_cfg, options.depth_factor, options.depth_init), cfg
    generator = torch.Generator().manual_seed(seed)
    return grow_width(dense_state, dense_cfg, cfg, options.split_noise, generator), cfg


def _split_layers(state: dict[str, torch.Tensor], n_layers: int) -> tuple[dict, list[dict]]:
    """(tensors outside the blocks, per layer {name within the block: tensor})."""
    shared, layers = {}, [{} for _ in range(n_layers)]
    for name, tensor in state.items():
        match = _LAYER_KEY.match(name)
        if match is None:
            shared[name] = tensor
        else:
            layers[int(match.group(1))][match.group(2)] = tensor
    return shared, layers


def grow_depth(dense_state: dict[str, torch.Tensor], dense_cfg: ModelConfig, factor: int,
               init: str = "identity") -> dict[str, torch.Tensor]:
    """factor x n_layers layers. identity: layer i, then factor - 1 copies of it with zero output
    projections (LLaMA Pro). stack: layers 0..L-1 repeated factor times (G_stack)."""
    shared, layers = _split_layers(dense_state, dense_cfg.n_layers)
    if init == "stack":
        grown = [layers[i % dense_cfg.n_layers] for i in range(factor * dense_cfg.n_layers)]
    elif init == "identity":
        identity_copy = [{name: torch.zeros_like(t) if name in _OUTPUT_PROJECTIONS else t for name, t in layer.items()}
                         for layer in layers]
        grown = [block for layer, copy in zip(layers, identity_copy) for block in [layer] + [copy] * (factor - 1)]
    else:
        raise ValueError(f"config key 'stage2.grow_depth.init': {init!r} is not one of {', '.join(DEPTH_INITS)}")
    state = {name: tensor.clone() for name, tensor in shared.items()}
    for index, layer in enumerate(grown):
        state.update({f"blocks.{index}.{name}": tensor.clone() for name, tensor in layer.items()})
    return state


def widen(incoming: list[torch.Tensor], outgoing: torch.Tensor, unit_rows: int, new_units: int,
          split_noise: float, generator: torch.Generator) -> tuple[list[torch.Tensor], torch.Tensor]:
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


def grow_width(dense_state: dict[str, torch.Tensor], dense_cfg: ModelConfig, grown_cfg: ModelConfig,
               split_noise: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Every layer's FFN widened to grown_cfg.ffn_hidden units and attention to grown_cfg.n_heads
    heads of the same size; embeddings, norms and the residual width are unchanged."""
    if grown_cfg.head_dim != dense_cfg.head_dim or grown_cfg.d_model != dense_cfg.d_model:
        raise ValueError("grow_width keeps d_model and the head size: see target_config")
    state = {name: tensor.clone() for name, tensor in dense_state.items()}
    for layer in range(dense_cfg.n_layers):
        block = f"blocks.{layer}"
        gate, up = dense_state[f"{block}.ffn.gate_up.weight"].split(dense_cfg.ffn_hidden, dim=0)
        (gate, up), down = widen([gate, up], dense_state[f"{block}.ffn.down.weight"], 1, grown_cfg.ffn_hidden,
                                 split_noise, generator)
        state[f"{block}.ffn.gate_up.weight"], state[f"{block}.ffn.down.weight"] = torch.cat([gate, up]), down
        q, k, v = dense_state[f"{block}.attn.qkv.weight"].split(dense_cfg.attn_width, dim=0)
        (q, k, v), out = widen([q, k, v], dense_state[f"{block}.attn.out.weight"], dense_cfg.head_dim,
                               grown_cfg.n_heads, split_noise, generator)
        state[f"{block}.attn.qkv.weight"], state[f"{block}.attn.out.weight"] = torch.cat([q, k, v]), out
    return state
