"""moe.dispatch grouped against DeepSpeed's GShard dispatch with nothing dropped (outputs, losses,
expert counts, every gradient), and the grouped GEMM against the reference loop over experts."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from upcycling.core.errors import InputError  # noqa: E402
from upcycling.model import moe_dispatch  # noqa: E402
from upcycling.model.flops import ModelConfig  # noqa: E402
from upcycling.model.transformer import MoEFeedForward, MoEOptions, Transformer  # noqa: E402

EXPERTS = 4


def _config(top_k: int, granularity: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=64,
        d_model=16,
        n_layers=2,
        n_heads=2,
        ffn_hidden=32,
        seq_len=8,
        experts=EXPERTS,
        top_k=top_k,
        granularity=granularity,
    )


def _gradients(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    # An expert that got no token may have no gradient in one dispatch and zeros in the other.
    return {
        name: torch.zeros_like(param) if param.grad is None else param.grad for name, param in module.named_parameters()
    }


def _assert_same_gradients(first: torch.nn.Module, second: torch.nn.Module) -> None:
    first_grads, second_grads = _gradients(first), _gradients(second)
    assert first_grads.keys() == second_grads.keys()
    for name, grad in first_grads.items():
        torch.testing.assert_close(second_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("granularity", [1, 2])
def test_grouped_equals_gshard_without_dropping(top_k, granularity):
    cfg = _config(top_k, granularity)
    torch.manual_seed(0)
    gshard = Transformer(cfg, MoEOptions(dispatch="gshard", z_loss_coef=1e-3))
    grouped = Transformer(cfg, MoEOptions(dispatch="grouped", z_loss_coef=1e-3))
    grouped.load_state_dict(gshard.state_dict())
    tokens = torch.randint(0, cfg.vocab_size, (3, cfg.seq_len))
    results = []
    for model in (gshard, grouped):
        logits, lm_loss, moe_loss = model(tokens, tokens)
        (lm_loss + moe_loss).backward()
        results.append((logits, moe_loss, model.moe_layers()))
    (gshard_logits, gshard_moe_loss, gshard_layers), (grouped_logits, grouped_moe_loss, grouped_layers) = results
    torch.testing.assert_close(grouped_logits, gshard_logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grouped_moe_loss, gshard_moe_loss, rtol=1e-6, atol=0)
    for gshard_layer, grouped_layer in zip(gshard_layers, grouped_layers):
        # What the trainer reads from the layers: same values and dtypes.
        assert torch.equal(grouped_layer.expert_counts, gshard_layer.expert_counts)
        assert grouped_layer.expert_counts.dtype == gshard_layer.expert_counts.dtype
        assert int(grouped_layer.expert_counts.sum()) == 3 * cfg.seq_len * top_k
        torch.testing.assert_close(grouped_layer.aux_loss, gshard_layer.aux_loss, rtol=1e-6, atol=0)
        torch.testing.assert_close(grouped_layer.z_loss, gshard_layer.z_loss, rtol=1e-6, atol=0)
    _assert_same_gradients(gshard, grouped)


@pytest.mark.parametrize("top_k,granularity", [(1, 1), (2, 1), (3, 1), (2, 2)])
def test_expert_without_tokens(top_k, granularity):
    """An expert nobody routes to: an empty block for the grouped dispatch, a zero-padded one for GShard."""
    cfg = _config(top_k, granularity)
    torch.manual_seed(1)
    gshard = MoEFeedForward(cfg, MoEOptions(dispatch="gshard"))
    grouped = MoEFeedForward(cfg, MoEOptions(dispatch="grouped"))
    with torch.no_grad():  # positive inputs, and expert 0's router row negative: it never wins
        gshard.router.weight.abs_()
        gshard.router.weight[0] = -1.0
    grouped.load_state_dict(gshard.state_dict())
    inputs = torch.randn(2, cfg.seq_len, cfg.d_model).abs()
    projection = torch.randn(2, cfg.seq_len, cfg.d_model)
    outputs = []
    for layer in (gshard, grouped):
        out = layer(inputs)
        ((out * projection).sum() + layer.aux_loss).backward()
        outputs.append(out)
    assert grouped.expert_counts[0] == 0 and torch.equal(grouped.expert_counts, gshard.expert_counts)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grouped.aux_loss, gshard.aux_loss)
    _assert_same_gradients(gshard, grouped)


@pytest.mark.skipif(moe_dispatch._GROUPED_MM is None, reason="this torch has no grouped_mm")
def test_grouped_gemm_equals_reference_loop():
    torch.manual_seed(2)
    layer = MoEFeedForward(_config(2, 1), MoEOptions())
    experts = layer.experts
    counts = torch.tensor([5, 0, 7, 4])  # one expert empty
    rows = torch.randn(int(counts.sum()), 16, requires_grad=True)
    projection = torch.randn(int(counts.sum()), 16)
    assert not moe_dispatch.grouped_mm_runs(rows, experts)  # CPU: the reference loop by default
    results = {}
    for grouped in (False, True):
        rows.grad = None
        experts.zero_grad(set_to_none=True)
        out = moe_dispatch.run_experts(rows, counts, experts, grouped=grouped)
        (out * projection).sum().backward()
        results[grouped] = (out.detach(), rows.grad.clone(), _gradients(experts))
    (loop_out, loop_rows_grad, loop_grads), (gemm_out, gemm_rows_grad, gemm_grads) = results[False], results[True]
    torch.testing.assert_close(gemm_out, loop_out)
    torch.testing.assert_close(gemm_rows_grad, loop_rows_grad)
    for name, grad in loop_grads.items():
        torch.testing.assert_close(gemm_grads[name], grad, msg=name)
    assert loop_grads["1.gate_up.weight"].abs().sum() == 0  # the empty expert learns nothing


def test_dispatch_follows_drop_tokens_unless_set():
    assert MoEOptions(drop_tokens=False).grouped
    assert not MoEOptions(drop_tokens=True).grouped
    assert not MoEOptions(drop_tokens=False, dispatch="gshard").grouped
    assert MoEOptions.from_settings({"drop_tokens": False, "dispatch": None, "copy_optimizer_state": False}).grouped


@pytest.mark.parametrize(
    "options,message",
    [
        ({"dispatch": "grouped", "drop_tokens": True}, "never drops tokens"),
        ({"dispatch": "tutel"}, "gshard or grouped"),
    ],
)
def test_bad_dispatch_is_refused(options, message):
    with pytest.raises(InputError, match=message):
        MoEOptions(**options)


def test_grouped_dispatch_compiles_to_one_graph(monkeypatch):
    """torch.compile traces the grouped path (as it runs on a GPU: bf16 grouped GEMMs) whole, and
    batches routed differently reuse that graph: no graph break, no recompile per step."""
    from torch._dynamo.testing import CompileCounter

    if moe_dispatch._GROUPED_MM is None:
        pytest.skip("this torch has no grouped_mm")
    monkeypatch.setattr(moe_dispatch, "grouped_mm_runs", lambda rows, experts: True)  # CPU bf16 runs it too
    torch._dynamo.reset()
    layer = MoEFeedForward(_config(2, 1), MoEOptions(dispatch="grouped", z_loss_coef=1e-3))
    counter = CompileCounter()
    compiled = torch.compile(layer, backend=counter, fullgraph=True)  # fullgraph: a graph break raises
    routings = []
    for seed in range(3):
        torch.manual_seed(seed)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = compiled(torch.randn(2, 8, 16))
        (out.float().sum() + layer.aux_loss + layer.z_loss).backward()
        routings.append(layer.expert_counts.clone())
    assert counter.frame_count == 1
    assert not torch.equal(routings[0], routings[1])  # the routing changed, the graph did not


CUDA_SM90 = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] not in moe_dispatch._GROUPED_MM_MAJORS,
    reason="needs a CUDA GPU where grouped_mm has its fused bf16 kernel (sm90; sm100 from torch 2.9): "
    "scripts/gpu-check.sh runs it",
)


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected.float()).norm() / expected.float().norm().clamp(min=1e-12))


@pytest.mark.gpu
@CUDA_SM90
def test_grouped_gemm_runs_on_cuda_and_equals_the_loop_in_bf16():
    torch.manual_seed(4)
    experts = MoEFeedForward(_config(2, 1), MoEOptions()).experts.cuda()
    counts = torch.tensor([40, 0, 72, 16], device="cuda")
    rows = torch.randn(int(counts.sum()), 16, device="cuda", requires_grad=True)
    projection = torch.randn(int(counts.sum()), 16, device="cuda")
    results = {}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert moe_dispatch.grouped_mm_runs(rows, experts)
        for grouped in (False, True):
            rows.grad = None
            experts.zero_grad(set_to_none=True)
            out = moe_dispatch.run_experts(rows, counts, experts, grouped=grouped)
            (out.float() * projection).sum().backward()
            results[grouped] = (out.detach(), rows.grad.clone(), _gradients(experts))
    assert _relative_error(results[True][0], results[False][0]) < 1e-2
    assert _relative_error(results[True][1], results[False][1]) < 1e-2
    for name, grad in results[False][2].items():
        if grad.abs().sum() > 0:
            assert _relative_error(results[True][2][name], grad) < 1e-2, name


@pytest.mark.gpu
@CUDA_SM90
def test_grouped_equals_gshard_on_cuda_in_bf16():
    cfg = ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, ffn_hidden=128, seq_len=32, experts=8, top_k=2)
    torch.manual_seed(5)
    gshard = Transformer(cfg, MoEOptions(dispatch="gshard")).cuda()
    grouped = Transformer(cfg, MoEOptions(dispatch="grouped")).cuda()
    grouped.load_state_dict(gshard.state_dict())
    tokens = torch.randint(0, cfg.vocab_size, (4, cfg.seq_len), device="cuda")
    results = []
    for model in (gshard, grouped):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits, lm_loss, moe_loss = model(tokens, tokens)
        (lm_loss + moe_loss).backward()
        results.append((logits, lm_loss, model.moe_layers()[0].expert_counts))
    # The first layer's routes are computed from the same inputs; later layers may flip near-ties.
    assert torch.equal(results[1][2], results[0][2])
    assert _relative_error(results[1][0], results[0][0]) < 2e-2
    assert float(results[1][1]) == pytest.approx(float(results[0][1]), rel=1e-2)
    gshard_grads, grouped_grads = _gradients(gshard), _gradients(grouped)
    for name, grad in gshard_grads.items():
        if grad.abs().sum() > 0:
            assert _relative_error(grouped_grads[name], grad) < 5e-2, name
