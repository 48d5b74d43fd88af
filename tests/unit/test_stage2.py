"""Second-stage transforms (stage2.py): function preservation of continue, grow_depth (identity) and
grow_width to 1e-5 in our model and in transformers; G_stack's exact copies; the copies of a
width growth diverging in training; parameter and FLOP counts of the grown models against the
modules; the stage2 config section and the `upcycling transform` command."""

from __future__ import annotations

import dataclasses
import json

import pytest

# The torch-free unit lane (pytest tests/unit without the train extra) skips this file.
pytest.importorskip("torch")

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from tiny_sweep import write_config
from upcycling.cli import main as cli_main
from upcycling.model.export import load_hf, save_hf
from upcycling.model.flops import ModelConfig, count_params, train_flops_per_token
from upcycling.model.transformer import MoEOptions, Transformer
from upcycling.sweep.load import ConfigError, load_sweep
from upcycling.sweep.load import stage2_problem as problem
from upcycling.sweep.models import options_for
from upcycling.transform.grow import transform
from upcycling.transform.methods import Stage2Options, target_config
from upcycling.transform.upcycle import upcycle_state

DENSE = ModelConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=4, ffn_hidden=64, seq_len=16)

# (method, options) of every function-preserving transform, with non-integer width factors too.
PRESERVING = [
    ("continue", Stage2Options()),
    ("grow_depth", Stage2Options(depth_factor=2)),
    ("grow_depth", Stage2Options(depth_factor=3)),
    ("grow_width", Stage2Options(ffn_factor=2, heads_factor=2)),
    ("grow_width", Stage2Options(ffn_factor=1.5, heads_factor=2)),
    ("grow_width", Stage2Options(ffn_factor=1.25, heads_factor=4)),
    ("grow_width", Stage2Options(ffn_factor=3, heads_factor=1)),
    ("grow_width", Stage2Options(ffn_factor=1, heads_factor=2, split_noise=0.1)),
    ("moe_upcycle", Stage2Options(experts=4, top_k=2)),
    ("moe_upcycle", Stage2Options(experts=8, top_k=4, granularity=2)),
]
DENSE_TARGETS = [case for case in PRESERVING if case[0] != "moe_upcycle"] + [
    ("grow_depth", Stage2Options(depth_factor=2, depth_init="stack"))
]


def _case_id(case) -> str:
    """The method and the options that differ from the defaults, e.g. grow_depth-depth_factor=3."""
    method, options = case
    changed = [
        f"{field.name}={getattr(options, field.name)}"
        for field in dataclasses.fields(options)
        if getattr(options, field.name) != field.default
    ]
    return "-".join([method, *changed])


def _dense_model(seed: int = 0) -> Transformer:
    """A dense model whose logits are far from uniform (weights well above init scale), so a
    transform that changes the function shows in the logits."""
    generator = torch.Generator().manual_seed(seed)
    model = Transformer(DENSE).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1 + 0.2 * noise if name.endswith("norm.weight") else 0.3 * noise)
    return model


def _load(state: dict, cfg: ModelConfig) -> Transformer:
    model = Transformer(cfg, MoEOptions(drop_tokens=False)).eval()
    model.load_state_dict(state, strict=True)
    return model


def _tokens(batch: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, DENSE.vocab_size, (batch, DENSE.seq_len), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", PRESERVING, ids=_case_id)
def test_transform_preserves_the_dense_function(case):
    method, options = case
    dense = _dense_model()
    state, cfg = transform(dense.state_dict(), DENSE, method, options, seed=3)
    assert cfg == target_config(DENSE, method, options)
    tokens = _tokens()
    with torch.no_grad():
        dense_logits, _, _ = dense(tokens)
        grown_logits, _, _ = _load(state, cfg)(tokens)
    assert dense_logits.std() > 1.0  # far from uniform: the comparison below has teeth
    torch.testing.assert_close(grown_logits, dense_logits, rtol=1e-5, atol=1e-5)
    # The input is never modified and never shared.
    for name, tensor in dense.state_dict().items():
        if name in state:
            assert state[name].data_ptr() != tensor.data_ptr()


def test_moe_upcycle_is_upcycle_py():
    dense = _dense_model()
    options = Stage2Options(experts=4, top_k=2, granularity=2, router_init_std=0.3)
    state, cfg = transform(dense.state_dict(), DENSE, "moe_upcycle", options, seed=5)
    expected, expected_cfg = upcycle_state(dense.state_dict(), DENSE, 4, 2, 2, router_init_std=0.3, seed=5)
    assert cfg == expected_cfg and state.keys() == expected.keys()
    assert all(torch.equal(state[name], expected[name]) for name in state)


def test_grow_depth_identity_blocks_copy_their_layer_with_zero_outputs_and_learn():
    dense = _dense_model()
    state, cfg = transform(dense.state_dict(), DENSE, "grow_depth", Stage2Options(depth_factor=3), seed=0)
    assert cfg.n_layers == 6
    for grown_index in range(6):
        source, is_copy = divmod(grown_index, 3)
        for name in (
            "attn.qkv.weight",
            "attn_norm.weight",
            "ffn.gate_up.weight",
            "ffn_norm.weight",
            "attn.out.weight",
            "ffn.down.weight",
        ):
            grown, original = state[f"blocks.{grown_index}.{name}"], dense.state_dict()[f"blocks.{source}.{name}"]
            if is_copy and name in ("attn.out.weight", "ffn.down.weight"):
                assert torch.count_nonzero(grown) == 0
            else:
                assert torch.equal(grown, original)
    # The zero output projections get gradients, so the new blocks start learning at once.
    grown = _load(state, cfg).train()
    tokens = _tokens()
    _, loss, _ = grown(tokens, torch.roll(tokens, -1, dims=1))
    loss.backward()
    assert grown.blocks[1].attn.out.weight.grad.abs().sum() > 0
    assert grown.blocks[1].ffn.down.weight.grad.abs().sum() > 0


def test_grow_depth_stack_repeats_the_layer_stack_and_changes_the_function():
    """G_stack (what Liew & Kato grow with) copies the stack; it is not function-preserving."""
    dense = _dense_model()
    options = Stage2Options(depth_factor=2, depth_init="stack")
    state, cfg = transform(dense.state_dict(), DENSE, "grow_depth", options, seed=0)
    assert cfg.n_layers == 4
    for name, tensor in state.items():
        if name.startswith("blocks."):
            index, rest = name.split(".", 2)[1:]
            assert torch.equal(tensor, dense.state_dict()[f"blocks.{int(index) % 2}.{rest}"])
    with torch.no_grad():
        assert not torch.allclose(_load(state, cfg)(_tokens())[0], dense(_tokens())[0], atol=1e-2)


def test_grow_width_copies_units_and_splits_their_outgoing_weights():
    dense = _dense_model()
    options = Stage2Options(ffn_factor=1.5, heads_factor=2, split_noise=0.05)
    state, cfg = transform(dense.state_dict(), DENSE, "grow_width", options, seed=0)
    assert (cfg.ffn_hidden, cfg.n_heads, cfg.head_dim, cfg.d_model) == (96, 8, 8, 32)
    old = dense.state_dict()
    old_gate_up, old_down = old["blocks.0.ffn.gate_up.weight"], old["blocks.0.ffn.down.weight"]
    gate_up, down = state["blocks.0.ffn.gate_up.weight"], state["blocks.0.ffn.down.weight"]
    # Unit 64 + u copies unit u for u < 32 (gate rows, then up rows); units 32..63 are not copied.
    assert torch.equal(gate_up[64:96], old_gate_up[:32]) and torch.equal(gate_up[96 + 64 :], old_gate_up[64:96])
    assert torch.equal(down[:, 32:64], old_down[:, 32:64])
    torch.testing.assert_close(down[:, :32] + down[:, 64:], old_down[:, :32], rtol=0, atol=1e-6)
    assert not torch.allclose(down[:, :32], down[:, 64:], atol=1e-3)  # split unevenly
    # Heads: head 4 + h copies head h in q, k and v; the two share h's output columns.
    for part in range(3):  # q, k, v
        grown = state["blocks.0.attn.qkv.weight"].split(64)[part].view(8, 8, 32)
        original = old["blocks.0.attn.qkv.weight"].split(32)[part].view(4, 8, 32)
        assert torch.equal(grown[4:], original) and torch.equal(grown[:4], original)
    out, old_out = state["blocks.0.attn.out.weight"].view(32, 8, 8), old["blocks.0.attn.out.weight"].view(32, 4, 8)
    torch.testing.assert_close(out[:, :4] + out[:, 4:], old_out, rtol=0, atol=1e-6)


def _copies_after_training(split_noise: float, steps: int) -> tuple[torch.Tensor, torch.Tensor, Transformer]:
    """(cosines between the first gradients of each copied FFN unit's gate row and its copy's,
    the same for the q rows of each copied head, the model after `steps` AdamW steps)."""
    torch.manual_seed(0)
    dense = Transformer(DENSE)  # plain init, as a trained model is: the noise must work at this scale
    state, cfg = transform(dense.state_dict(), DENSE, "grow_width", Stage2Options(split_noise=split_noise), seed=0)
    grown = _load(state, cfg).train()
    tokens = _tokens(8)
    targets = torch.roll(tokens, -1, dims=1)
    optimizer = torch.optim.AdamW(grown.parameters(), lr=3e-3, weight_decay=0.1)
    cosines = None
    for _ in range(steps):
        optimizer.zero_grad()
        _, loss, _ = grown(tokens, targets)
        loss.backward()
        if cosines is None:
            gate = grown.blocks[0].ffn.gate_up.weight.grad[:128]
            q = grown.blocks[0].attn.qkv.weight.grad[:64].view(8, -1)
            cosines = (F.cosine_similarity(gate[:64], gate[64:], dim=1), F.cosine_similarity(q[:4], q[4:], dim=1))
        optimizer.step()
    return *cosines, grown


def test_width_copies_get_different_gradients_and_diverge_in_training():
    """Exact copies with equal outgoing weights stay identical under AdamW; the zero-sum split
    noise makes every copy's gradient point elsewhere from step one, and the copies part."""
    ffn_cos, head_cos, grown = _copies_after_training(split_noise=0.01, steps=5)
    assert ffn_cos.max() < 1 - 1e-5 and head_cos.max() < 1 - 1e-5
    gate = grown.blocks[0].ffn.gate_up.weight.detach()[:128]
    q = grown.blocks[0].attn.qkv.weight.detach()[:64].view(8, -1)
    # Every copy has moved away from its original (measured: 0.3% to 13% of the row's norm).
    for original, copy in ((gate[:64], gate[64:]), (q[:4], q[4:])):
        assert ((copy - original).norm(dim=1) / original.norm(dim=1)).min() > 1e-3

    ffn_cos, head_cos, symmetric = _copies_after_training(split_noise=0.0, steps=5)
    gate = symmetric.blocks[0].ffn.gate_up.weight.detach()[:128]
    torch.testing.assert_close(gate[:64], gate[64:])  # the failure the noise prevents
    assert ffn_cos.min() > 1 - 1e-5


@pytest.mark.parametrize("case", DENSE_TARGETS, ids=_case_id)
def test_grown_param_and_flop_counts_match_the_modules(case):
    cfg = target_config(DENSE, *case)
    model = Transformer(cfg)
    counts = count_params(cfg)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.embed.weight.numel() + model.lm_head.weight.numel()
    assert (counts.total, counts.non_embedding) == (total, total - embedding)
    # FLOPs of one training step, counted by torch on the math attention kernel (which, like the
    # formula, does the full seq x seq products).
    tokens = _tokens(2)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        _, loss, _ = model(tokens, tokens)
        loss.backward()
    assert counter.get_total_flops() == tokens.numel() * train_flops_per_token(cfg)


@pytest.mark.parametrize(
    "method,options",
    [
        ("grow_width", Stage2Options(ffn_factor=1.5, heads_factor=2)),
        ("grow_depth", Stage2Options(depth_factor=2)),
    ],
)
def test_grown_export_loads_in_transformers_with_same_logits(tmp_path, method, options):
    transformers = pytest.importorskip("transformers")
    state, cfg = transform(_dense_model().state_dict(), DENSE, method, options, seed=0)
    model = _load(state, cfg)
    with torch.no_grad():  # make the copies differ so the check covers where each head/unit goes
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    save_hf(model.state_dict(), cfg, tmp_path / "grown")
    hf_model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "grown").eval()
    tokens = _tokens(2)
    with torch.no_grad():
        torch.testing.assert_close(hf_model(tokens).logits, model(tokens)[0], rtol=1e-5, atol=1e-5)
    loaded_state, loaded_cfg, raw = load_hf(tmp_path / "grown")
    assert loaded_cfg == cfg and raw["head_dim"] == 8
    assert all(
        torch.equal(loaded_state[name], tensor)
        for name, tensor in model.state_dict().items()
        if not name.startswith("rope_")
    )


@pytest.mark.parametrize(
    "method,options,dense,message",
    [
        ("grow", Stage2Options(), DENSE, "unknown second-stage method"),
        ("grow_width", Stage2Options(ffn_factor=1.3), DENSE, r"ffn_factor': 64 FFN hidden units x 1.3"),
        ("grow_width", Stage2Options(heads_factor=1.1), DENSE, r"heads_factor': 4 heads"),
        ("grow_width", Stage2Options(heads_factor=1.5), DENSE, "6 heads do not divide d_model=32"),
        ("grow_width", Stage2Options(ffn_factor=1, heads_factor=1), DENSE, "method 'continue'"),
        ("grow_depth", Stage2Options(depth_factor=1), DENSE, r"grow_depth.factor"),
        ("grow_depth", Stage2Options(depth_init="interleave"), DENSE, r"grow_depth.init"),
        ("moe_upcycle", Stage2Options(), DENSE, "at least 2 experts"),
        ("moe_upcycle", Stage2Options(experts=4, top_k=5), DENSE, "top_k"),
        ("continue", Stage2Options(), dataclasses.replace(DENSE, experts=4, top_k=2), "dense checkpoint"),
    ],
)
def test_bad_options_are_refused_with_the_key_to_fix(method, options, dense, message):
    with pytest.raises(ValueError, match=message):
        target_config(dense, method, options)


def test_stage2_config_section_defaults_and_options(tmp_path):
    sweep = load_sweep(write_config(tmp_path), check_corpus=False)
    assert sweep.stage2.methods == ("moe_upcycle",) and sweep.stage2.corpus is None
    expected = Stage2Options(experts=4, top_k=2, router_init_std=sweep.moe.router_init_std)
    assert options_for(sweep, 4, 2) == expected
    stage2 = {
        "methods": ["continue", "grow_width", "grow_depth"],
        "grow_depth": {"factor": 3, "init": "stack"},
        "grow_width": {"ffn_factor": 1.5, "split_noise": 0},
    }
    sweep = load_sweep(write_config(tmp_path, {"stage2": stage2}), check_corpus=False)
    options = options_for(sweep)
    assert (
        options.depth_factor,
        options.depth_init,
        options.ffn_factor,
        options.heads_factor,
        options.split_noise,
    ) == (3, "stack", 1.5, 2, 0)
    assert problem(sweep) is None  # every dense model of the tiny config can grow so
    stage2["grow_width"]["ffn_factor"] = 1.3
    with pytest.raises(ConfigError, match=r"grow_width on dense model '\w+': .*ffn_factor"):
        load_sweep(write_config(tmp_path, {"stage2": stage2}), check_corpus=False)
    for bad, key in [
        ({"methods": ["grow"]}, "stage2.methods"),
        ({"corpus": {"path": "x"}}, "stage2.corpus"),
        ({"grow_depth": {"factor": 1}}, "stage2.grow_depth.factor"),
    ]:
        with pytest.raises(ConfigError, match=key):
            load_sweep(write_config(tmp_path, {"stage2": bad}), check_corpus=False)


def _transform_spec(tmp_path, method, out, **options):
    return json.dumps(
        {
            "method": method,
            "options": dataclasses.asdict(Stage2Options(**options)),
            "dense": str(tmp_path / "dense"),
            "out": str(tmp_path / out),
            "seed": 2,
            "copy_optimizer_state": False,
        }
    )


def test_transform_command_writes_the_initial_export(tmp_path):
    dense = _dense_model()
    save_hf(dense.state_dict(), DENSE, tmp_path / "dense")
    spec = _transform_spec(tmp_path, "grow_width", "grown", ffn_factor=1.5, heads_factor=2)
    assert cli_main(["transform", "--spec", spec]) == 0
    state, cfg, raw = load_hf(tmp_path / "grown")
    assert (cfg.ffn_hidden, cfg.n_heads) == (96, 8)
    assert raw["upcycling"]["stage2_method"] == "grow_width" and raw["upcycling"]["ffn_factor"] == 1.5
    with torch.no_grad():
        torch.testing.assert_close(_load(state, cfg)(_tokens())[0], dense(_tokens())[0], rtol=1e-5, atol=1e-5)

    assert cli_main(["transform", "--spec", _transform_spec(tmp_path, "moe_upcycle", "moe", experts=4, top_k=2)]) == 0
    assert json.loads((tmp_path / "moe" / "config.json").read_text())["num_local_experts"] == 4


@pytest.mark.parametrize(
    "method,message", [("grow", "unknown second-stage method"), ("moe_upcycle", "at least 2 experts")]
)
def test_transform_command_refuses_bad_input_before_writing(tmp_path, capsys, method, message):
    save_hf(_dense_model().state_dict(), DENSE, tmp_path / "dense")
    code = cli_main(["transform", "--spec", _transform_spec(tmp_path, method, "out")])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
