"""The chunked LM-head loss (a dense-path lever, off by default) equals the plain one: loss and
gradients, with ignored targets, a last chunk shorter than the others, fp32 and bf16 autocast."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from upcycling.model.flops import ModelConfig  # noqa: E402
from upcycling.model.transformer import Transformer  # noqa: E402

CFG = ModelConfig(vocab_size=96, d_model=16, n_layers=1, n_heads=2, ffn_hidden=32, seq_len=10)


def _loss_and_gradients(model: Transformer, tokens: torch.Tensor, targets: torch.Tensor, dtype):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        logits, lm_loss, _ = model(tokens, targets)
    lm_loss.backward()
    return logits, lm_loss.detach(), {name: param.grad.clone() for name, param in model.named_parameters()}


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_chunked_loss_equals_the_plain_loss(dtype, tolerance):
    torch.manual_seed(0)
    plain = Transformer(CFG)
    chunked = Transformer(CFG, loss_chunk_rows=7)  # 30 rows: chunks of 7, 7, 7, 7 and 2
    chunked.load_state_dict(plain.state_dict())
    tokens = torch.randint(0, CFG.vocab_size, (3, CFG.seq_len))
    targets = torch.randint(0, CFG.vocab_size, (3, CFG.seq_len))
    targets[0, :4] = -100  # budget padding is ignored
    plain_logits, plain_loss, plain_grads = _loss_and_gradients(plain, tokens, targets, dtype)
    chunked_logits, chunked_loss, chunked_grads = _loss_and_gradients(chunked, tokens, targets, dtype)
    assert plain_logits is not None and chunked_logits is None  # the point: no logits held whole
    torch.testing.assert_close(chunked_loss, plain_loss, rtol=tolerance, atol=tolerance)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(
            chunked_grads[name], grad, rtol=tolerance, atol=tolerance * grad.abs().max(), msg=name
        )


def test_chunked_loss_of_a_fully_masked_batch_is_zero():
    model = Transformer(CFG, loss_chunk_rows=4)
    tokens = torch.randint(0, CFG.vocab_size, (1, CFG.seq_len))
    _, loss, _ = model(tokens, torch.full_like(tokens, -100))
    assert loss.item() == 0.0


def test_chunked_loss_under_no_grad_equals_the_plain_loss():
    torch.manual_seed(1)
    plain = Transformer(CFG)
    chunked = Transformer(CFG, loss_chunk_rows=8)
    chunked.load_state_dict(plain.state_dict())
    tokens = torch.randint(0, CFG.vocab_size, (2, CFG.seq_len))
    with torch.no_grad():  # evaluation: no gradient is made
        torch.testing.assert_close(chunked(tokens, tokens)[1], plain(tokens, tokens)[1])
