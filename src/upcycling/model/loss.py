"""The LM head and cross-entropy in row chunks, never holding fp32 logits over the whole vocabulary.

The plain loss computes ``lm_head(hidden)`` for every token, casts the logits to fp32 and takes the
cross-entropy: at batch 16 x 1024 and a 32k vocabulary that is 2 GiB of fp32 logits (plus their bf16
copy and gradient), all memory-bound passes. Here each chunk of rows gets its logits, its loss and its
gradients at once (as Liger's and cut-cross-entropy's fused losses do), so only one chunk's logits
ever exist. The arithmetic is the plain loss's: logits in the compute dtype (autocast's), softmax and
log-sum-exp in fp32, logit gradients cast back to the compute dtype for the two matmuls; the weight
gradient is summed over chunks in fp32. A lever measured by benchmarks/bench_train.py
(``--loss-chunk-rows``); the model's default is the plain loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk_rows: int, dtype: torch.dtype, grad_enabled: bool
    ) -> Tensor:
        # Gradients are made here, with the logits; not under no_grad (evaluation), where
        # needs_input_grad still says True.
        wants_grad = grad_enabled and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        weight_c = weight.to(dtype)
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden, dtype=dtype) if wants_grad else hidden.new_empty(0)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if wants_grad else weight.new_empty(0)
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = hidden[start : start + chunk_rows].to(dtype)
            chunk_targets = targets[start : start + chunk_rows]
            logits = (rows @ weight_c.t()).float()
            counted = chunk_targets != IGNORE_INDEX
            safe_targets = torch.where(counted, chunk_targets, torch.zeros_like(chunk_targets))
            log_normaliser = torch.logsumexp(logits, dim=-1)
            target_logits = logits.gather(1, safe_targets.unsqueeze(1)).squeeze(1)
            loss_sum += ((log_normaliser - target_logits) * counted).sum()
            if wants_grad:
                grad_logits = torch.softmax(logits, dim=-1)
                grad_logits.scatter_add_(1, safe_targets.unsqueeze(1), -torch.ones_like(target_logits).unsqueeze(1))
                grad_logits = (grad_logits * counted.unsqueeze(1)).to(dtype)
                grad_hidden[start : start + chunk_rows] = grad_logits @ weight_c
                grad_weight += (grad_logits.t() @ rows).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.input_dtypes = hidden.dtype, weight.dtype
        return loss_sum

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.input_dtypes
        return (
            (grad_hidden * grad_loss).to(hidden_dtype) if ctx.needs_input_grad[0] else None,
            (grad_weight * grad_loss).to(weight_dtype) if ctx.needs_input_grad[1] else None,
            None,
            None,
            None,
            None,
        )


def chunked_linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, chunk_rows: int) -> Tensor:
    """Sum over rows of ``cross_entropy(hidden @ weight.T, targets)``, targets of -100 ignored.

    hidden: [N, d]; weight: the LM head's [V, d]; targets: [N]. Equals
    ``F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")`` up to rounding.
    """
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    with torch.autocast(device_type, enabled=False):  # the dtypes are chosen above, explicitly
        return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk_rows, dtype, torch.is_grad_enabled())


def plain_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """The same sum from materialised logits: fp32 over the whole vocabulary."""
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
