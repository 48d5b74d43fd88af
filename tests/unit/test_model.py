"""The model's parameter and FLOP counts (pure functions) against the modules themselves, and the
Hugging Face Llama export giving the same logits."""

from __future__ import annotations

import pytest

# The torch-free unit lane (pytest tests/unit without the train extra) skips this file.
pytest.importorskip("torch")

import torch

from upcycling.model.export import load_hf, save_hf
from upcycling.model.flops import ModelConfig, count_params, train_flops_per_token
from upcycling.model.transformer import MoEOptions, Transformer

DENSE = ModelConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=4, ffn_hidden=48, seq_len=16)


def _module_counts(model: Transformer) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    embedding = model.embed.weight.numel() + model.lm_head.weight.numel()
    return total, total - embedding


@pytest.mark.parametrize("experts,top_k,granularity", [(1, 1, 1), (4, 2, 1), (8, 2, 2), (4, 1, 1)])
def test_param_counts_match_module(experts, top_k, granularity):
    cfg = ModelConfig(**{**DENSE.__dict__, "experts": experts, "top_k": top_k, "granularity": granularity})
    model = Transformer(cfg)
    counts = count_params(cfg)
    assert (counts.total, counts.non_embedding) == _module_counts(model)
    if experts == 1:
        assert counts.active == counts.total
    else:
        expert_params = sum(p.numel() for p in model.blocks[0].ffn.experts[0].parameters())
        per_layer_inactive = (experts - top_k) * expert_params
        assert counts.total - counts.active == cfg.n_layers * per_layer_inactive


def test_flops_per_token_counts_matmuls_and_attention():
    counts = count_params(DENSE)
    norm_weights = (2 * DENSE.n_layers + 1) * DENSE.d_model
    expected = 6 * (counts.non_embedding - norm_weights + DENSE.vocab_size * DENSE.d_model)
    expected += 12 * DENSE.n_layers * DENSE.seq_len * DENSE.d_model
    assert train_flops_per_token(DENSE) == expected
    # An MoE with k of E experts costs its active parameters, not its total.
    moe = ModelConfig(**{**DENSE.__dict__, "experts": 8, "top_k": 2})
    two_experts_dense = ModelConfig(**{**DENSE.__dict__, "ffn_hidden": 2 * DENSE.ffn_hidden})
    router_flops = 6 * DENSE.n_layers * DENSE.d_model * 8
    assert train_flops_per_token(moe) == pytest.approx(train_flops_per_token(two_experts_dense) + router_flops)


def test_causal_and_deterministic():
    torch.manual_seed(0)
    model = Transformer(DENSE).eval()
    tokens = torch.randint(0, DENSE.vocab_size, (2, DENSE.seq_len))
    logits, _, _ = model(tokens)
    changed = tokens.clone()
    changed[:, -1] = (changed[:, -1] + 1) % DENSE.vocab_size
    logits_changed, _, _ = model(changed)
    # The future does not leak into the past.
    torch.testing.assert_close(logits[:, :-1], logits_changed[:, :-1])
    torch.testing.assert_close(model(tokens)[0], logits, rtol=0, atol=0)


def test_fully_masked_batch_has_zero_loss_not_nan():
    model = Transformer(DENSE)
    tokens = torch.randint(0, DENSE.vocab_size, (1, DENSE.seq_len))
    _, loss, _ = model(tokens, torch.full_like(tokens, -100))
    assert loss.item() == 0.0


def test_from_scratch_moe_experts_are_independent():
    cfg = ModelConfig(**{**DENSE.__dict__, "experts": 4, "top_k": 2})
    model = Transformer(cfg, MoEOptions())
    experts = model.blocks[0].ffn.experts
    assert not torch.equal(experts[0].gate_up.weight, experts[1].gate_up.weight)


def test_llama_export_loads_in_transformers_with_same_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1)
    model = Transformer(DENSE).eval()
    save_hf(model.state_dict(), DENSE, tmp_path / "hf")
    hf_model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = torch.randint(0, DENSE.vocab_size, (2, DENSE.seq_len))
    with torch.no_grad():
        ours, _, _ = model(tokens)
        theirs = hf_model(tokens).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    # And back: the export round-trips to the same state.
    state, cfg, _ = load_hf(tmp_path / "hf")
    assert cfg == DENSE
    for name, tensor in model.state_dict().items():
        if name.startswith("rope_"):
            continue
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0)
