"""Upcycling preserves the dense model's function (token dropping off, k >= 2), for plain and
granular upcycling, and the Mixtral export loads in transformers with the same logits."""

from __future__ import annotations

import dataclasses

import pytest

# The torch-free unit lane (pytest tests/unit without the train extra) skips this file.
pytest.importorskip("torch")

import torch

from upcycling.model.export import CheckpointError, load_hf, save_hf
from upcycling.model.flops import ModelConfig
from upcycling.model.transformer import MoEOptions, Transformer
from upcycling.transform.upcycle import upcycle_state

DENSE = ModelConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=4, ffn_hidden=64, seq_len=16)
NO_DROP = MoEOptions(drop_tokens=False)


def _dense_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(DENSE).eval()


def _upcycled(dense: Transformer, experts: int, top_k: int, granularity: int) -> Transformer:
    state, cfg = upcycle_state(dense.state_dict(), DENSE, experts, top_k, granularity, router_init_std=0.5)
    moe = Transformer(cfg, NO_DROP).eval()
    moe.load_state_dict(state, strict=True)
    return moe


@pytest.mark.parametrize("experts,top_k,granularity", [(4, 2, 1), (8, 2, 1), (4, 2, 2), (8, 4, 2), (8, 4, 4)])
def test_upcycled_model_computes_the_dense_function(experts, top_k, granularity):
    dense = _dense_model()
    moe = _upcycled(dense, experts, top_k, granularity)
    tokens = torch.randint(0, DENSE.vocab_size, (4, DENSE.seq_len))
    with torch.no_grad():
        dense_logits, _, _ = dense(tokens)
        moe_logits, _, _ = moe(tokens)
    torch.testing.assert_close(moe_logits, dense_logits, rtol=1e-5, atol=1e-5)
    # The routers are fresh and random, so the check above is not trivially about one expert.
    router = moe.blocks[0].ffn.router.weight
    assert router.abs().sum() > 0
    assert torch.equal(router[0], router[granularity - 1])  # a virtual group shares its row


def test_top1_gating_scales_by_gate_probability():
    """Documented limit: DeepSpeed's top-1 gate multiplies the expert output by its probability."""
    dense = _dense_model()
    moe = _upcycled(dense, 4, 1, 1)
    tokens = torch.randint(0, DENSE.vocab_size, (2, DENSE.seq_len))
    with torch.no_grad():
        dense_logits, _, _ = dense(tokens)
        moe_logits, _, _ = moe(tokens)
    assert not torch.allclose(moe_logits, dense_logits, atol=1e-4)


def test_upcycling_copies_everything_but_the_ffn():
    dense = _dense_model()
    state, cfg = upcycle_state(dense.state_dict(), DENSE, 4, 2, 2)
    for name, tensor in dense.state_dict().items():
        if ".ffn." not in name:
            assert torch.equal(state[name], tensor)
    expert = "blocks.1.ffn.moe.deepspeed_moe.experts.deepspeed_experts"
    gate_up = dense.state_dict()["blocks.1.ffn.gate_up.weight"]
    # Expert 3 = copy 1 of slice 1: the second half of the 64 gate rows and of the 64 up rows.
    expected = torch.cat([gate_up[32:64], gate_up[96:128]])
    assert torch.equal(state[f"{expert}.3.gate_up.weight"], expected)
    assert cfg.expert_hidden == 32 and cfg.experts == 4


@pytest.mark.parametrize(
    "experts,top_k,granularity,message", [(3, 2, 2, "granularity"), (4, 5, 1, "top_k"), (6, 2, 3, "granularity")]
)
def test_bad_upcycling_shapes_are_refused(experts, top_k, granularity, message):
    with pytest.raises(ValueError, match=message):
        upcycle_state(_dense_model().state_dict(), DENSE, experts, top_k, granularity)


def test_mixtral_export_loads_in_transformers_with_same_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    dense = _dense_model()
    moe = _upcycled(dense, 4, 2, 1)
    # Make the experts differ so the check covers routing, not only the copy.
    with torch.no_grad():
        for block in moe.blocks:
            for expert in block.ffn.experts:
                expert.down.weight.add_(torch.randn_like(expert.down.weight) * 0.05)
    save_hf(moe.state_dict(), moe.cfg, tmp_path / "mixtral")
    hf_model = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "mixtral").eval()
    tokens = torch.randint(0, DENSE.vocab_size, (2, DENSE.seq_len))
    with torch.no_grad():
        ours, _, _ = moe(tokens)
        theirs = hf_model(tokens).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    state, cfg, raw = load_hf(tmp_path / "mixtral")
    assert cfg == moe.cfg and raw["num_local_experts"] == 4


def test_corrupt_or_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="missing"):
        load_hf(tmp_path / "nowhere")
    save_hf(_dense_model().state_dict(), DENSE, tmp_path / "dense")
    weights = tmp_path / "dense" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_hf(tmp_path / "dense")


def test_upcycling_an_moe_is_refused():
    moe_cfg = dataclasses.replace(DENSE, experts=4, top_k=2)
    with pytest.raises(ValueError, match="dense checkpoint"):
        upcycle_state({}, moe_cfg, 4, 2)


def test_adam_moments_follow_the_weights():
    from upcycling.transform.upcycle import upcycle_adam_moments

    dense = _dense_model()
    exp_avg = {name: torch.randn_like(t) for name, t in dense.state_dict().items()}
    exp_avg_sq = {name: torch.rand_like(t) for name, t in dense.state_dict().items()}
    _, cfg = upcycle_state(dense.state_dict(), DENSE, 4, 2, 2)
    moe_avg, moe_avg_sq = upcycle_adam_moments(exp_avg, exp_avg_sq, cfg)
    expert = "blocks.0.ffn.moe.deepspeed_moe.experts.deepspeed_experts.1"
    assert torch.equal(moe_avg[f"{expert}.down.weight"], exp_avg["blocks.0.ffn.down.weight"][:, 32:] * 2)
    assert torch.equal(moe_avg_sq[f"{expert}.down.weight"], exp_avg_sq["blocks.0.ffn.down.weight"][:, 32:] * 4)
    assert torch.count_nonzero(moe_avg["blocks.0.ffn.moe.deepspeed_moe.gate.wg.weight"]) == 0
    assert torch.equal(moe_avg["embed.weight"], exp_avg["embed.weight"])
