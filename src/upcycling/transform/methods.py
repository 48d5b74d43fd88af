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
different directions from the first step (tested in tests/unit/test_stage2.py).

Here: the methods' architectures and options (pure, no torch: the job inventory sizes jobs with
them). The tensor work is in grow.py; ``upcycling transform`` is the I/O edge (cli.py).
"""

from __future__ import annotations

import dataclasses
import math

from upcycling.model.flops import ModelConfig

METHODS = ("moe_upcycle", "continue", "grow_depth", "grow_width")
DEPTH_INITS = ("identity", "stack")


@dataclasses.dataclass(frozen=True)
class Stage2Options:
    """Everything a transform needs besides the dense model; defaults match the config schema."""

    # moe_upcycle: the sweep's E, k and G of the job, and moe.router_init_std
    experts: int = 0
    top_k: int = 0
    granularity: int = 1
    router_init_std: float = 0.02
    # moe_upcycle: Drop-Upcycling's fraction of each expert's FFN units re-drawn (the job's sweep.reinit_ratio)
    reinit_ratio: float = 0.0
    # grow_depth (stage2.grow_depth)
    depth_factor: int = 2
    depth_init: str = "identity"
    # grow_width (stage2.grow_width)
    ffn_factor: float = 2.0
    heads_factor: float = 2.0
    split_noise: float = 0.01

    def to_dict(self) -> dict:
        """The options as a transform job's spec spells them (``Stage2Options(**them)`` reads them
        back): ``reinit_ratio`` only where it re-draws, so the r = 0 jobs keep the spec they had
        before Drop-Upcycling existed."""
        fields = dataclasses.asdict(self)
        if self.reinit_ratio == 0:
            del fields["reinit_ratio"]
        return fields


def describe(method: str, options: Stage2Options) -> dict:
    """The options that shaped a method's initial model, for the export's provenance."""
    relevant = {
        "moe_upcycle": ("experts", "top_k", "granularity", "router_init_std"),
        "continue": (),
        "grow_depth": ("depth_factor", "depth_init"),
        "grow_width": ("ffn_factor", "heads_factor", "split_noise"),
    }[_checked_method(method)]
    if method == "moe_upcycle" and options.reinit_ratio > 0:  # r = 0 exports say what they always said
        relevant = (*relevant, "reinit_ratio")
    return {"stage2_method": method, **{name: getattr(options, name) for name in relevant}}


def reinit_suffix(ratio: float) -> str:
    """What an upcycled MoE's variant label adds for Drop-Upcycling's r: ``_r0.5``; nothing for
    r = 0 (plain sparse upcycling keeps its paths)."""
    return f"_r{ratio:g}" if ratio > 0 else ""


def _checked_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(
            f"unknown second-stage method {method!r}: pick one of {', '.join(METHODS)} (config key 'stage2.methods')"
        )
    return method


def _grown(count: int, factor: float, what: str, key: str) -> int:
    """count x factor, which must be a whole number (a model has no fractional heads or units)."""
    grown = count * factor
    if not math.isclose(grown, round(grown), abs_tol=1e-9):
        raise ValueError(
            f"config key '{key}': {count} {what} x {factor} = {grown:g} is not a whole number: "
            f"pick a factor that makes it one (a multiple of 1/{count})"
        )
    return round(grown)


def moe_config(dense_cfg: ModelConfig, experts: int, top_k: int, granularity: int) -> ModelConfig:
    if dense_cfg.is_moe:
        raise ValueError("upcycling needs a dense checkpoint, got an MoE (num_local_experts > 1)")
    if experts % granularity or dense_cfg.ffn_hidden % granularity:
        raise ValueError(
            f"granularity {granularity} must divide experts ({experts}) and ffn_hidden ({dense_cfg.ffn_hidden})"
        )
    if not 1 <= top_k <= experts:
        raise ValueError(f"top_k={top_k} must be between 1 and experts={experts}")
    return dataclasses.replace(dense_cfg, experts=experts, top_k=top_k, granularity=granularity)


def target_config(dense_cfg: ModelConfig, method: str, options: Stage2Options) -> ModelConfig:
    """The architecture a method trains over D2 (also that of its from-scratch baseline)."""
    _checked_method(method)
    if dense_cfg.is_moe:
        raise ValueError("second-stage transforms start from a dense checkpoint, got an MoE (num_local_experts > 1)")
    if method == "moe_upcycle":
        if options.experts < 2:
            raise ValueError(
                f"moe_upcycle needs at least 2 experts, got experts={options.experts}: "
                "give the job's E and k (config keys 'sweep.experts', 'sweep.top_k')"
            )
        return moe_config(dense_cfg, options.experts, options.top_k, options.granularity)
    if method == "continue":
        return dense_cfg
    if method == "grow_depth":
        if options.depth_init not in DEPTH_INITS:
            raise ValueError(
                f"config key 'stage2.grow_depth.init': {options.depth_init!r} is not one of {', '.join(DEPTH_INITS)}"
            )
        if not (isinstance(options.depth_factor, int) and options.depth_factor >= 2):
            raise ValueError(
                f"config key 'stage2.grow_depth.factor': {options.depth_factor!r} must be a whole "
                "number >= 2 (the grown model has factor x n_layers layers)"
            )
        return dataclasses.replace(dense_cfg, n_layers=dense_cfg.n_layers * options.depth_factor)
    # grow_width
    if options.ffn_factor < 1 or options.heads_factor < 1 or (options.ffn_factor, options.heads_factor) == (1, 1):
        raise ValueError(
            f"config keys 'stage2.grow_width.ffn_factor' / 'heads_factor' "
            f"({options.ffn_factor}, {options.heads_factor}): each must be >= 1 and one above 1; "
            "a model that does not grow is method 'continue'"
        )
    if options.split_noise < 0:
        raise ValueError(f"config key 'stage2.grow_width.split_noise': {options.split_noise} must be >= 0")
    n_heads = _grown(dense_cfg.n_heads, options.heads_factor, "heads", "stage2.grow_width.heads_factor")
    if dense_cfg.d_model % n_heads:
        # Not a limit of our model: transformers' LlamaConfig refuses it even with an explicit head_dim.
        raise ValueError(
            f"config key 'stage2.grow_width.heads_factor': {n_heads} heads do not divide "
            f"d_model={dense_cfg.d_model}, and transformers cannot load such a Llama export: "
            "pick a factor that gives a divisor of d_model (2 always does)"
        )
    return dataclasses.replace(
        dense_cfg,
        ffn_hidden=_grown(dense_cfg.ffn_hidden, options.ffn_factor, "FFN hidden units", "stage2.grow_width.ffn_factor"),
        n_heads=n_heads,
        explicit_head_dim=dense_cfg.head_dim if n_heads != dense_cfg.n_heads else dense_cfg.explicit_head_dim,
    )
