"""The sweep's models and token sets, as the stages below it need them (pure, no torch)."""

from __future__ import annotations

from upcycling.core.layout import TOKEN_SETS
from upcycling.model.flops import ModelConfig
from upcycling.sweep.settings import Sweep
from upcycling.transform.methods import Stage2Options


def model_config(
    sweep: Sweep, size: str, vocab_size: int, experts: int = 1, top_k: int = 1, granularity: int = 1
) -> ModelConfig:
    dims = sweep.dense_models[size]
    return ModelConfig(
        vocab_size=vocab_size,
        d_model=dims.d_model,
        n_layers=dims.n_layers,
        n_heads=dims.n_heads,
        ffn_hidden=dims.ffn_hidden,
        seq_len=sweep.data.seq_len,
        rope_theta=dims.rope_theta,
        experts=experts,
        top_k=top_k if experts > 1 else 1,
        granularity=granularity if experts > 1 else 1,
    )


def token_sets(sweep: Sweep) -> tuple[str, ...]:
    """The corpora the sweep tokenizes: the first, and stage2.corpus where `continue` trains on it."""
    second = sweep.stage2.corpus is not None and "continue" in sweep.stage2.methods
    return TOKEN_SETS if second else TOKEN_SETS[:1]


def options_for(
    sweep: Sweep, experts: int = 0, top_k: int = 0, granularity: int = 1, reinit_ratio: float = 0.0
) -> Stage2Options:
    """The options of a typed sweep (its ``stage2`` and ``moe`` sections) for one job."""
    return Stage2Options(
        experts=experts,
        top_k=top_k,
        granularity=granularity,
        router_init_std=sweep.moe.router_init_std,
        reinit_ratio=reinit_ratio,
        depth_factor=sweep.stage2.grow_depth.factor,
        depth_init=sweep.stage2.grow_depth.init,
        ffn_factor=sweep.stage2.grow_width.ffn_factor,
        heads_factor=sweep.stage2.grow_width.heads_factor,
        split_noise=sweep.stage2.grow_width.split_noise,
    )
