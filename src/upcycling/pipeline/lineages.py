"""The lineages of a sweep: every chain of training jobs that shares one model and one start.

A lineage is ``dense`` (size, seed), ``upcycled`` (size, seed, D1, variant) or ``scratch`` (size,
seed, variant). The variant names the second-stage model: ``e4_k2_g1`` for an MoE of 4 experts,
top-2, granularity 1, made by sparse upcycling (method ``moe_upcycle``; ``e4_k2_g1_r0.5`` when
Drop-Upcycling re-draws half of each expert's FFN units, sweep.reinit_ratio), or the name of another
second-stage method (``continue``, ``grow_depth``, ``grow_width``: upcycling.transform.methods).
Pure functions of the sweep; :mod:`upcycling.pipeline.jobs` turns each lineage into its jobs.
"""

from __future__ import annotations

from dataclasses import dataclass

from upcycling.core.layout import DENSE, SCRATCH, UPCYCLED
from upcycling.model.flops import ModelConfig
from upcycling.sweep.models import model_config, options_for
from upcycling.sweep.settings import Sweep
from upcycling.transform.methods import METHODS, reinit_suffix, target_config


def moe_variant(experts: int, top_k: int, granularity: int) -> str:
    return f"e{experts}_k{top_k}_g{granularity}"


_OTHER_METHODS = "|".join(method for method in METHODS if method != "moe_upcycle")
VARIANT_PATTERN = r"e\d+_k\d+_g\d+(?:_r[0-9.e+-]+)?|" + _OTHER_METHODS


@dataclass(frozen=True)
class Lineage:
    """Everything one chain of jobs shares: the model, where it starts, and its runs' budgets.

    ``method``: the second-stage method of an upcycled lineage (how its model is made from the
    dense one) and of a scratch lineage (whose architecture it trains from scratch)."""

    family: str  # dense | upcycled | scratch
    size: str
    seed: int
    budgets: tuple[int, ...]
    d1: int = 0  # upcycled: the dense budget it starts from
    experts: int = 1
    top_k: int = 1
    granularity: int = 1
    method: str = "dense"  # second-stage method; "dense" for the dense runs
    # upcycled moe_upcycle: Drop-Upcycling's re-drawn fraction (scratch and dense runs have none)
    reinit_ratio: float = 0.0

    @property
    def variant(self) -> str:
        """The second-stage model's name in paths: ``e4_k2_g1`` (``e4_k2_g1_r0.5``) for an MoE, else the method."""
        if self.family == "dense":
            return ""
        if self.method != "moe_upcycle":
            return self.method
        return moe_variant(self.experts, self.top_k, self.granularity) + reinit_suffix(self.reinit_ratio)

    @property
    def wildcards(self) -> dict[str, str]:
        wildcards = {"size": self.size, "seed": str(self.seed)}
        if self.family == "upcycled":
            wildcards["d1"] = str(self.d1)
        if self.family != "dense":
            wildcards["variant"] = self.variant
        return wildcards

    @property
    def name(self) -> str:
        return {"dense": DENSE, "upcycled": UPCYCLED, "scratch": SCRATCH}[self.family].format(**self.wildcards)


def lineages(sweep: Sweep) -> list[Lineage]:
    axes, methods = sweep.sweep, sweep.stage2.methods
    shapes = [(e, k, g) for e in axes.experts for k in axes.top_k for g in axes.granularity]
    dense_methods = [method for method in methods if method != "moe_upcycle"]
    result: list[Lineage] = []
    for size in sweep.dense_models:
        for seed in sweep.training.seeds:
            result.append(Lineage("dense", size, seed, axes.d1_tokens))
            for d1 in axes.d1_tokens:
                if "moe_upcycle" in methods:
                    result.extend(
                        Lineage("upcycled", size, seed, axes.d2_tokens, d1, e, k, g, "moe_upcycle", ratio)
                        for e, k, g in shapes
                        for ratio in axes.reinit_ratio
                    )
                result.extend(
                    Lineage("upcycled", size, seed, axes.d2_tokens, d1, method=method) for method in dense_methods
                )
            if axes.model_config is not None and "moe_upcycle" in methods:
                extra = axes.model_config
                result.extend(
                    Lineage("upcycled", size, seed, (extra.d2_tokens,), extra.d1_tokens, e, k, 1, "moe_upcycle")
                    for e in extra.experts
                    for k in extra.top_k
                    if (e, k, 1) not in shapes or 0 not in axes.reinit_ratio  # these are r = 0 runs
                )
            if sweep.baselines.scratch_moe:
                if "moe_upcycle" in methods:
                    result.extend(
                        Lineage("scratch", size, seed, sweep.scratch_d_tokens, 0, e, k, g, "moe_upcycle")
                        for e, k, g in shapes
                    )
                result.extend(
                    Lineage("scratch", size, seed, sweep.scratch_d_tokens, method=method) for method in dense_methods
                )
    return result


def lineage_model(sweep: Sweep, lineage: Lineage, vocab_size: int | None = None) -> ModelConfig:
    """The architecture a lineage trains: the dense model, or its method's second-stage model."""
    dense = model_config(sweep, lineage.size, vocab_size or sweep.tokenizer.vocab_size)
    if lineage.family == "dense":
        return dense
    options = options_for(sweep, lineage.experts, lineage.top_k, lineage.granularity, lineage.reinit_ratio)
    return target_config(dense, lineage.method, options)


def stable_points(sweep: Sweep, lineage: Lineage) -> list[int]:
    """WSD: where each run of the lineage leaves the stable phase, in order (none for cosine)."""
    if not sweep.training.wsd:
        return []
    return sorted({sweep.training.decay_start(budget) for budget in lineage.budgets})
