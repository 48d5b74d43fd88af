"""A synthetic study of the default sweep's shape, made from known laws, as a results store.

Parameter counts are those of the default config's models (``upcycling.model.flops.count_params``,
vocabulary 2048); losses follow the truths below with multiplicative noise. Shape (per method):
3 sizes x 3 D1 x 4 D2 upcycled runs, 3 sizes x 3 D1 dense runs, 3 sizes x 5 D from-scratch runs,
and (``sparsity=True``, moe_upcycle only) 2 extra expert counts at one (D1, D2) pair per size,
9 (P, N2) configurations with the main one.

``reinit_alpha3`` (a mapping r -> alpha3): Drop-Upcycling's re-initialisation ratio as a
coordinate; moe_upcycle's upcycled grid is run at every r with that r's interaction, the other
runs (dense, from scratch, the sparsity axis) at r = 0 only, as the sweep runs them. Each
moe_upcycle run at r also records its experts' weight similarity (``REINIT_SIMILARITY``) and
largest load share.
"""

from __future__ import annotations

import math

import numpy as np

from upcycling.analysis import laws
from upcycling.analysis import store as results
from upcycling.model.flops import ModelConfig, count_params

SIZES = {"xxs": (32, 2, 2, 96), "xs": (64, 2, 4, 176), "s": (96, 3, 4, 256)}
D1 = [65536, 131072, 262144]
D2 = [32768, 65536, 131072, 262144]
SCRATCH_D = [32768, 65536, 131072, 262144, 393216]
SPARSITY_PAIR = (131072, 131072)
SPARSITY_EXPERTS = (2, 8)
# The methods of the study the fit-stage tests share (conftest.fitted), and fit settings that keep it quick.
METHODS = ("moe_upcycle", "continue", "grow_depth")
QUICK_FIT = {"bootstrap": 8, "huber_delta": 1e-3, "seed": 0, "n_starts": 4}


def dataset_truth(alpha3: float, slope1: float = 0.1, slope2: float = 0.3, term: float = 1.5):
    """Dataset-law coefficients from the term's size and local slopes at the grid's centre."""
    d1c, d2c = math.exp(np.log(D1).mean()), math.exp(np.log(D2).mean())
    alpha2 = slope2 + alpha3 * math.log(d1c)
    alpha1 = slope1 + alpha3 * math.log(d2c)
    amplitude = term * math.exp(alpha1 * math.log(d1c) + slope2 * math.log(d2c))
    return dict(A=amplitude, alpha1=alpha1, alpha2=alpha2, alpha3=alpha3)


# non-embedding counts: N1 from 2.7e4 to 3.3e5
TRUE_JOINT = {**dataset_truth(0.02), "B": 1.0 * 1e5**0.3, "beta2": 0.3, "E": 2.5}
TRUE_SCRATCH = dict(E=2.5, A=1.0 * 1.7e5**0.3, alpha=0.3, B=2.0 * 1.3e5**0.6, beta=0.6)
TRUE_DENSE = dict(E=2.5, A=1.0 * 1e5**0.3, alpha=0.3, B=2.0 * 1.3e5**0.4, beta=0.4)
METHOD_ALPHA3 = {"moe_upcycle": 0.02, "continue": 0.035, "grow_depth": 0.01, "grow_width": 0.01}
SPARSITY_GAIN = dict(A=0.3, beta1=0.8)  # loss - A P^-beta1 + A P0^-beta1 across expert counts
REINIT_ALPHA3 = {0.0: 0.02, 0.5: 0.05}  # a Drop-Upcycling study whose r differ in the interaction
REINIT_SIMILARITY = {0.0: 0.9, 0.5: 0.5}  # experts' mean pairwise cosine similarity at r (others: 1 - r)


def counts(size: str, experts: int = 1, top_k: int = 1, layers_factor: int = 1):
    d_model, n_layers, n_heads, ffn = SIZES[size]
    return count_params(
        ModelConfig(2048, d_model, n_layers * layers_factor, n_heads, ffn, 128, experts=experts, top_k=top_k)
    )


def _record(size, init, method, d1, d2, experts, top_k, loss, model, dense, reinit_ratio=None):
    coords = dict(
        size=size,
        init=init,
        method=method,
        seed=0,
        d1_tokens=d1,
        d2_tokens=d2,
        experts=experts,
        top_k=top_k,
        granularity=1,
    )
    experts_record = {}
    if reinit_ratio is not None:
        coords["reinit_ratio"] = reinit_ratio
        if init == "upcycled" and experts > 1:
            similarity = REINIT_SIMILARITY.get(reinit_ratio, 1.0 - reinit_ratio)
            experts_record = {"expert_similarity": similarity, "expert_load_max": 1.5 / experts}
    tokens = d1 if init == "dense" else d2
    return {
        **experts_record,
        "path": "/".join(str(v) for v in coords.values()),
        "coords": coords,
        "final_val_loss": loss,
        "flops": 6.0 * model.active * tokens,
        "n_params": model.total,
        "active_params": model.active,
        "dense_params": dense.total,
        "non_embedding_params": model.non_embedding,
        "active_non_embedding_params": model.active_non_embedding,
        "dense_non_embedding_params": dense.non_embedding,
        "tokens_seen": tokens,
        "wall_time_s": 1.0,
        "curve_tokens": np.array([tokens // 2, tokens], dtype=np.int64),
        "curve_val_loss": np.array([loss + 0.2, loss]),
    }


def _architecture(size, method):
    """(experts, top_k, second-stage counts) of a method's second-stage model."""
    if method == "moe_upcycle":
        return 4, 2, counts(size, 4, 2)
    if method == "grow_depth":
        return 1, 1, counts(size, layers_factor=2)
    return 1, 1, counts(size)  # continue (grow_width is not modelled here: same as continue)


def records(
    methods=("moe_upcycle",),
    noise: float = 0.002,
    seed: int = 0,
    sparsity: bool = True,
    sizes=tuple(SIZES),
    reinit_alpha3=None,
) -> list[dict]:
    rng = np.random.default_rng(seed)
    # the ratios each method's upcycled grid is run at (None: no such coordinate) and their alpha3
    plain = None if reinit_alpha3 is None else 0.0

    def ratios(method):
        if reinit_alpha3 is None or method != "moe_upcycle":
            return {plain: METHOD_ALPHA3[method]}
        return dict(reinit_alpha3)

    def noisy(value):
        return float(value * math.exp(rng.normal(0.0, noise)))

    out = []
    for size in sizes:
        dense = counts(size)
        n1 = dense.non_embedding
        for d1 in D1:
            loss = noisy(laws.chinchilla(n1, d1, **TRUE_DENSE))
            out.append(_record(size, "dense", "dense", d1, 0, 1, 1, loss, dense, dense, plain))
        for method in methods:
            experts, top_k, model = _architecture(size, method)
            for ratio, alpha3 in ratios(method).items():
                truth = {**TRUE_JOINT, **dataset_truth(alpha3)}
                for d1 in D1:
                    for d2 in D2:
                        loss = noisy(laws.joint(d1, d2, n1, **truth))
                        out.append(_record(size, "upcycled", method, d1, d2, experts, top_k, loss, model, dense, ratio))
            for d in SCRATCH_D:
                loss = noisy(laws.chinchilla(model.active_non_embedding, d, **TRUE_SCRATCH))
                out.append(_record(size, "scratch", method, 0, d, experts, top_k, loss, model, dense, plain))
        if sparsity and "moe_upcycle" in methods:
            d1, d2 = SPARSITY_PAIR
            main = counts(size, 4, 2)
            for experts in SPARSITY_EXPERTS:
                model = counts(size, experts, 2)
                p, p0 = (m.non_embedding / m.active_non_embedding for m in (model, main))
                gain = SPARSITY_GAIN["A"] * (p ** -SPARSITY_GAIN["beta1"] - p0 ** -SPARSITY_GAIN["beta1"])
                loss = noisy(laws.joint(d1, d2, n1, **TRUE_JOINT) + gain)
                out.append(_record(size, "upcycled", "moe_upcycle", d1, d2, experts, 2, loss, model, dense, plain))
    return out


def store(path, **kwargs):
    """Write the synthetic study to ``path`` (a zarr store) and return the opened Dataset."""
    ds = results.build_dataset(records(**kwargs), "tokenizer:\n  vocab_size: 2048\n", "synthetic")
    results.write_store(ds, path)
    return results.load_losses(path)
