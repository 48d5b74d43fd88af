"""Drop-Upcycling's partial re-initialisation of an expert (upcycling.transform.reinit)."""

from __future__ import annotations

import hashlib
import math

import pytest

torch = pytest.importorskip("torch")

from upcycling.transform.reinit import DenseStats, expert_generator, reinit_count, reinit_units  # noqa: E402

HIDDEN, D_MODEL = 256, 64


def _dense(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    gate = torch.randn(HIDDEN, D_MODEL, generator=generator) * 0.05 + 0.01
    up = torch.randn(HIDDEN, D_MODEL, generator=generator) * 0.02 - 0.003
    down = torch.randn(D_MODEL, HIDDEN, generator=generator) * 0.03
    return gate, up, down


@pytest.mark.parametrize("ratio,expected", [(0.0, 0), (0.5, 128), (0.25, 64), (1.0, 256), (0.3, 77)])
def test_the_redrawn_fraction_is_round_r_times_hidden(ratio, expected):
    gate, up, down = _dense()
    new_gate, new_up, new_down, indices = reinit_units(
        gate, up, down, ratio, DenseStats.of(gate, up, down), expert_generator(0, 0, 0)
    )
    assert reinit_count(ratio, HIDDEN) == expected == len(indices) == len(set(indices.tolist()))
    kept = torch.ones(HIDDEN, dtype=torch.bool)
    kept[indices] = False
    # The units not drawn are the dense weights, exactly; the drawn ones all differ.
    assert torch.equal(new_gate[kept], gate[kept]) and torch.equal(new_up[kept], up[kept])
    assert torch.equal(new_down[:, kept], down[:, kept])
    assert bool((new_gate[~kept] != gate[~kept]).all()) and bool((new_down[:, ~kept] != down[:, ~kept]).all())


def test_redrawn_units_follow_the_dense_matrices_mean_and_std():
    gate, up, down = _dense()
    stats = DenseStats.of(gate, up, down)
    new_gate, new_up, new_down, indices = reinit_units(gate, up, down, 0.5, stats, expert_generator(3, 1, 2))
    for block, (mean, std) in (
        (new_gate[indices], stats.gate),
        (new_up[indices], stats.up),
        (new_down[:, indices], stats.down),
    ):
        count = block.numel()  # 8192 draws: the sample mean is within 4 standard errors
        assert abs(float(block.mean()) - mean) < 4 * std / count**0.5
        assert abs(float(block.std()) / std - 1) < 4 / (2 * count) ** 0.5


def test_the_draws_are_a_function_of_seed_layer_and_expert():
    gate, up, down = _dense()
    stats = DenseStats.of(gate, up, down)

    def draw(seed, layer, expert):
        return reinit_units(gate, up, down, 0.5, stats, expert_generator(seed, layer, expert))

    first, again = draw(0, 1, 2), draw(0, 1, 2)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    for other in (draw(0, 1, 3), draw(0, 2, 2), draw(1, 1, 2)):
        assert not torch.equal(first[3], other[3])  # other experts re-draw other units


def test_inputs_are_not_modified_and_a_bad_ratio_is_refused():
    gate, up, down = _dense()
    copies = [tensor.clone() for tensor in (gate, up, down)]
    reinit_units(gate, up, down, 1.0, DenseStats.of(gate, up, down), expert_generator(0, 0, 0))
    assert all(torch.equal(a, b) for a, b in zip(copies, (gate, up, down)))
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="sweep.reinit_ratio"):
            reinit_count(bad, HIDDEN)


# ----------------------------------------------------------------------------- in upcycle_state

from upcycling.model.flops import ModelConfig  # noqa: E402
from upcycling.model.transformer import Transformer, expert_weight_name, router_weight_name  # noqa: E402
from upcycling.transform.upcycle import upcycle_adam_moments, upcycle_state  # noqa: E402

DENSE = ModelConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=4, ffn_hidden=64, seq_len=16)


def _dense_state(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    return Transformer(DENSE).state_dict()


def _expert(state: dict, layer: int, expert: int):
    """An expert's (gate, up, down) of an upcycled state."""
    gate, up = state[expert_weight_name(layer, expert, "gate_up.weight")].chunk(2)
    return gate, up, state[expert_weight_name(layer, expert, "down.weight")]


def _dense_slice(dense: dict, layer: int, units: slice):
    gate, up = dense[f"blocks.{layer}.ffn.gate_up.weight"].split(DENSE.ffn_hidden)
    return gate[units], up[units], dense[f"blocks.{layer}.ffn.down.weight"][:, units]


def _redrawn_units(expert_weights, dense_weights, scale: float) -> torch.Tensor:
    """The units where an expert is not (scale x) the dense slice, checked to be the same in
    gate, up and down."""
    (gate, up, down), (dense_gate, dense_up, dense_down) = expert_weights, dense_weights
    changed_gate = (gate != dense_gate).all(dim=1)
    assert torch.equal(changed_gate, (up != dense_up).all(dim=1))
    assert torch.equal(changed_gate, (down != dense_down * scale).all(dim=0))
    # A unit is re-drawn whole or kept whole, never partly.
    assert torch.equal(~changed_gate, (gate == dense_gate).all(dim=1))
    assert torch.equal(~changed_gate, (down == dense_down * scale).all(dim=0))
    return changed_gate.nonzero().flatten()


# sha256 over (name, bytes) of upcycle_state's output, in name order, for a seeded random dense state:
# computed with the code before reinit_ratio existed (commit a7c8d81), so r = 0 is pinned to it.
R0_DIGESTS = {
    (4, 2, 1): "ae8905e56f70d700c7b129e909b10786f8cc4b20269e0a9605c2a0cbd9958fec",
    (4, 2, 2): "dbbd36fb14281e323b72c5539dd5d7903e52a73bf72a66cc52b3e930a0e159a7",
    (8, 2, 2): "67081932a51ec75a99961822461c1afa6909e6fb06d3fd07758e925ea5d5b3e1",
}


def _state_digest(state: dict) -> str:
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].contiguous().numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize("shape", sorted(R0_DIGESTS))
def test_r0_is_the_upcycled_init_from_before_drop_upcycling_bit_for_bit(shape):
    shapes = {name: tensor.shape for name, tensor in Transformer(DENSE).state_dict().items()}
    generator = torch.Generator().manual_seed(11)
    dense = {name: torch.randn(shapes[name], generator=generator) for name in sorted(shapes)}
    upcycled, _ = upcycle_state(dense, DENSE, *shape, router_init_std=0.3, seed=7, reinit_ratio=0.0)
    assert _state_digest(upcycled) == R0_DIGESTS[shape]
    experts, _, granularity = shape
    hidden = DENSE.ffn_hidden // granularity
    for expert in range(experts):  # every expert a copy of its dense slice (down x G), as always
        units = slice((expert % granularity) * hidden, (expert % granularity + 1) * hidden)
        assert len(_redrawn_units(_expert(upcycled, 1, expert), _dense_slice(dense, 1, units), granularity)) == 0


@pytest.mark.parametrize("experts,top_k,granularity,ratio", [(4, 2, 1, 0.5), (4, 2, 2, 0.5), (8, 4, 2, 0.25)])
def test_each_expert_redraws_round_r_of_its_units_and_keeps_the_rest(experts, top_k, granularity, ratio):
    dense = _dense_state()
    plain, _ = upcycle_state(dense, DENSE, experts, top_k, granularity, seed=3)
    state, cfg = upcycle_state(dense, DENSE, experts, top_k, granularity, seed=3, reinit_ratio=ratio)
    per_expert = DENSE.ffn_hidden // granularity
    for layer in range(DENSE.n_layers):
        # The routers draw as they do without re-initialisation; attention and norms are copies.
        assert torch.equal(state[router_weight_name(layer)], plain[router_weight_name(layer)])
        drawn = []
        for expert in range(experts):
            units = slice((expert % granularity) * per_expert, (expert % granularity + 1) * per_expert)
            redrawn = _redrawn_units(_expert(state, layer, expert), _dense_slice(dense, layer, units), granularity)
            assert len(redrawn) == round(ratio * per_expert)
            drawn.append(redrawn)
        assert len({tuple(units.tolist()) for units in drawn}) == experts  # different experts, different units
    assert all(torch.equal(state[name], plain[name]) for name in plain if ".ffn." not in name)
    assert cfg.expert_hidden == per_expert


def test_the_redrawn_down_columns_are_scaled_by_g_after_the_draw():
    dense = _dense_state()
    state, _ = upcycle_state(dense, DENSE, 8, 4, 2, seed=1, reinit_ratio=1.0)
    down = torch.cat([_expert(state, 0, expert)[2] for expert in range(8)], dim=1)
    dense_down = dense["blocks.0.ffn.down.weight"]
    # Drawn with the dense matrix's std, then x G like every upcycled down projection.
    assert abs(float(down.std()) / (2 * float(dense_down.std())) - 1) < 0.05


def test_the_redrawn_units_adam_moments_start_at_zero():
    dense = _dense_state()
    exp_avg = {name: torch.randn_like(tensor) for name, tensor in dense.items()}
    exp_avg_sq = {name: torch.rand_like(tensor) for name, tensor in dense.items()}
    state, cfg = upcycle_state(dense, DENSE, 4, 2, 2, seed=5, reinit_ratio=0.5)
    avg, avg_sq = upcycle_adam_moments(exp_avg, exp_avg_sq, cfg, reinit_ratio=0.5, seed=5)
    plain_avg, plain_avg_sq = upcycle_adam_moments(exp_avg, exp_avg_sq, cfg)
    for layer in range(DENSE.n_layers):
        for expert in range(4):
            units = slice((expert % 2) * 32, (expert % 2 + 1) * 32)
            redrawn = _redrawn_units(_expert(state, layer, expert), _dense_slice(dense, layer, units), 2)
            for moments, plain in ((avg, plain_avg), (avg_sq, plain_avg_sq)):
                gate, up, down = _expert(moments, layer, expert)
                plain_gate, plain_up, plain_down = _expert(plain, layer, expert)
                kept = torch.ones(32, dtype=torch.bool)
                kept[redrawn] = False
                assert not gate[~kept].any() and not up[~kept].any() and not down[:, ~kept].any()
                assert torch.equal(gate[kept], plain_gate[kept]) and torch.equal(down[:, kept], plain_down[:, kept])
                assert torch.equal(up[kept], plain_up[kept])


def test_expert_similarity_is_the_mean_pairwise_cosine_of_the_experts_weights():
    from upcycling.model.transformer import MoEOptions
    from upcycling.train.loop import expert_similarity

    dense = _dense_state()

    def similarity(ratio: float) -> list[float]:
        state, cfg = upcycle_state(dense, DENSE, 4, 2, seed=0, reinit_ratio=ratio)
        model = Transformer(cfg, MoEOptions(drop_tokens=False))
        model.load_state_dict(state, strict=True)
        return expert_similarity(model)

    assert similarity(0.0) == pytest.approx([1.0, 1.0])  # plain upcycling: E copies of one FFN
    dropped = similarity(0.5)
    state, _ = upcycle_state(dense, DENSE, 4, 2, seed=0, reinit_ratio=0.5)
    for layer, value in enumerate(dropped):
        vectors = torch.stack([torch.cat([w.flatten() for w in _expert(state, layer, e)]) for e in range(4)])
        cosines = torch.nn.functional.cosine_similarity(vectors[:, None], vectors[None], dim=-1)
        assert value == pytest.approx(float((cosines.sum() - 4) / 12), abs=1e-6)
        assert value < 0.9  # re-drawing half the units bought diversity
    assert expert_similarity(Transformer(DENSE)) is None


def test_expert_similarity_of_fewer_than_two_experts_is_none_and_the_store_reads_it_as_nan():
    """E = 1 has no pair of experts: None (null in metrics.json), never 0/0 = NaN written as a value."""
    from types import SimpleNamespace

    from upcycling.analysis.store import expert_summaries
    from upcycling.model.transformer import MoEOptions
    from upcycling.train.loop import expert_similarity

    one_expert = SimpleNamespace(experts=[torch.nn.Linear(4, 4)])
    module = SimpleNamespace(
        moe_layers=lambda: [one_expert, one_expert],
        cfg=SimpleNamespace(experts=1),
        moe_options=MoEOptions(),
    )
    assert expert_similarity(module) is None  # type: ignore[arg-type]
    summaries = expert_summaries(None, [[1.0], [1.0]])
    assert math.isnan(summaries["expert_similarity"]) and summaries["expert_load_max"] == 1.0
