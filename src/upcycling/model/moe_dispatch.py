"""``moe.dispatch: grouped``: a dropless forward for DeepSpeed-MoE's layer, over its own modules.

The layer stays ``deepspeed.moe.layer.MoE`` (its ``TopKGate`` router and ``Experts`` list, so weight
names, ZeRO's expert groups, checkpoints, exports and upcycling are those of ``gshard``); only the
forward differs. GShard with ``drop_tokens: false`` pads every expert to the largest expert's count
(an all-reduce and a host sync per layer, and a shape that changes every step) and runs the experts
one after another. Here:

1. :func:`route` repeats DeepSpeed's gating math (``top1gating``, ``top2gating``, ``topkgating`` of
   ``deepspeed.moe.sharded_moe``) without the capacity step: the same routes, gate weights, aux loss
   and expert counts as GShard when nothing is dropped, and the router logits for the z-loss.
2. The token copies are sorted into expert order (stable argsort) and counted per expert on the
   device: no host sync, and shapes that depend only on the batch (so torch.compile keeps one graph).
3. :func:`run_experts` runs all experts as two grouped GEMMs over the sorted rows where
   ``grouped_mm`` has its fused kernel (CUDA sm90, and sm100 from torch 2.9; bf16; sizes multiples
   of 8), else the experts' own modules one by one (the reference: CPU, fp32, other GPUs).
4. The combine gathers each route's result back (a permutation, so its gradient has no colliding
   writes) and sums the k routes weighted by the gate in fp32, in GShard's order: deterministic.

With ``ep_size > 1`` the sorted rows go to the rank holding their expert by one ``all_to_all_single``
with variable splits over DeepSpeed's expert-parallel group, and come back the same way: the counts
are exchanged first, and the split sizes are the one host sync of the layer. No capacity padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SwiGLUExpert(Protocol):
    """What the grouped GEMMs read of an expert (upcycling.model.transformer.SwiGLU)."""

    gate_up: nn.Linear  # [gate; up] rows, 2 x hidden by d_model
    down: nn.Linear
    hidden: int


# DeepSpeed's TopKGate and MOELayer: their attributes (k, wg, ep_group, experts, ...) are set in
# __init__ without annotations, so they are typed loosely here.
DeepSpeedModule = Any

# torch >= 2.9 names it in the public API; 2.8 has the private op; older: the reference loop only.
_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
# The GPU generations (compute capability major) where torch's grouped GEMM has its fused kernel:
# Hopper only in torch 2.8 (it refuses others); Hopper and Blackwell (sm100) from 2.9, which runs
# other GPUs of sm80+ through a per-group fallback that syncs with the host, no better than our loop.
_GROUPED_MM_MAJORS = (9, 10) if hasattr(F, "grouped_mm") else (9,)
# What the CUDA grouped GEMM kernels take (torch's own checks; DeepSpeed's AutoEP uses the same).
_GROUPED_MM_ALIGNMENT = 8


@dataclass(frozen=True)
class Routes:
    """Where each of ``s`` tokens goes (k routes each) and what the router says about it."""

    experts: Tensor  # [s, k] int64, global expert index of each route
    weights: Tensor  # [s, k] fp32, the gate weight each route's result is scaled by
    aux_loss: Tensor  # the load-balancing loss, DeepSpeed's l_aux
    expert_counts: Tensor  # [E] int64, routes per expert (DeepSpeed's exp_counts)
    logits: Tensor  # [s, E] router logits as DeepSpeed's gate computes them (for the z-loss)


def swiglu(gate_up: Tensor, hidden: int) -> Tensor:
    """SwiGLU's activation over a [gate; up] projection (the dense FFN's and every expert's)."""
    gate, up = gate_up.split(hidden, dim=-1)
    return F.silu(gate) * up


def route(gate: DeepSpeedModule, tokens: Tensor) -> Routes:
    """DeepSpeed's ``TopKGate`` routing of ``tokens`` [s, d] with unlimited capacity.

    The same calls in the same order as DeepSpeed (logits from fp32 inputs, softmax, argmax or topk,
    the same normalisation and aux-loss formula per k), so routes and values match GShard's.
    """
    if gate.noisy_gate_policy not in (None, "None") or (gate.k == 2 and gate.top2_2nd_expert_sampling):
        raise ValueError(
            "moe.dispatch grouped routes deterministically: build the MoE layer with noisy_gate_policy=None "
            "and top2_2nd_expert_sampling=False (upcycling.model.transformer.MoEFeedForward does)"
        )
    logits = F.linear(tokens.float(), weight=gate.wg.weight.float(), bias=None)
    gates = F.softmax(logits, dim=1)
    num_experts, k = gates.shape[1], gate.k
    expert_share = torch.mean(gates, dim=0)
    if k == 1:  # top1gating: the expert output is scaled by its probability (no renormalisation)
        top = torch.argmax(gates, dim=1, keepdim=True)
        weights = gates.gather(1, top)
        first_share = torch.mean(F.one_hot(top[:, 0], num_classes=num_experts).float(), dim=0)
        aux_loss = torch.sum(expert_share * first_share) * num_experts
    elif k == 2:  # top2gating: the second expert is the best remaining logit
        first = torch.argmax(gates, dim=1)
        first_mask = F.one_hot(first, num_classes=num_experts)
        second = torch.argmax(logits.masked_fill(first_mask.bool(), float("-inf")), dim=1)
        top = torch.stack([first, second], dim=1)
        chosen = gates.gather(1, top)
        denominator = torch.clamp(chosen[:, 0] + chosen[:, 1], min=torch.finfo(chosen.dtype).eps)
        weights = chosen / denominator.unsqueeze(1)
        aux_loss = torch.mean(expert_share * torch.mean(first_mask.float(), dim=0)) * num_experts * num_experts
    else:  # topkgating
        _, top = torch.topk(gates, k=k, dim=1)
        mask = torch.zeros_like(gates, dtype=torch.bool).scatter_(1, top, True)
        denominator = torch.clamp(torch.sum(gates * mask, dim=-1, keepdim=True), min=torch.finfo(gates.dtype).eps)
        weights = gates.gather(1, top) / denominator
        aux_loss = torch.mean(expert_share * torch.mean(mask.float(), dim=0)) * num_experts * num_experts / k
    return Routes(top, weights, aux_loss, count_per_expert(top, num_experts), logits)


def count_per_expert(experts: Tensor, num_experts: int) -> Tensor:
    """Routes per expert, on the device (bincount would read its length back from the device)."""
    flat = experts.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def inverse_permutation(order: Tensor) -> Tensor:
    return torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))


def compute_dtype(tokens: Tensor) -> torch.dtype:
    """The dtype the experts' matmuls run in: autocast's where it is on (the trainer's bf16)."""
    device_type = tokens.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else tokens.dtype


def grouped_mm_runs(rows: Tensor, experts: nn.ModuleList) -> bool:
    """Whether torch's grouped GEMM takes these rows and experts (else the reference loop runs)."""
    expert = _swiglu_experts(experts)[0]
    d_model, hidden = expert.gate_up.weight.shape[1], expert.hidden
    return (
        _GROUPED_MM is not None
        and rows.is_cuda
        and compute_dtype(rows) == torch.bfloat16
        and _capability(rows.device)[0] in _GROUPED_MM_MAJORS
        and d_model % _GROUPED_MM_ALIGNMENT == 0
        and hidden % _GROUPED_MM_ALIGNMENT == 0
    )


def _capability(device: torch.device) -> tuple[int, int]:
    # get_device_properties, not get_device_capability: torch.compile folds it to a constant.
    properties = torch.cuda.get_device_properties(device)
    return properties.major, properties.minor


def run_experts(rows: Tensor, counts: Tensor, experts: nn.ModuleList, grouped: bool | None = None) -> Tensor:
    """Each expert's SwiGLU over its block of ``rows`` (sorted by expert, ``counts`` rows each).

    ``grouped``: None picks the grouped GEMM where it runs (:func:`grouped_mm_runs`); True or False
    forces one (tests compare them). Both give the same result up to float rounding.
    """
    if grouped is None:
        # No rows (an expert-parallel rank whose experts drew no token): the loop's empty matmuls
        # still give every expert weight its (zero) gradient, which ZeRO's reduction expects.
        grouped = grouped_mm_runs(rows, experts) and rows.shape[0] > 0
    return _grouped_experts(rows, counts, experts) if grouped else _looped_experts(rows, counts, experts)


def _grouped_experts(rows: Tensor, counts: Tensor, experts: nn.ModuleList) -> Tensor:
    if _GROUPED_MM is None:
        raise RuntimeError(f"torch {torch.__version__} has no grouped_mm: use the reference loop (grouped=False)")
    dtype = compute_dtype(rows)
    swiglus = _swiglu_experts(experts)
    # One [E, N, K] block per weight, handed over transposed (column-major), as the kernels want.
    # Cast, then stack: the cast is the one autocast makes for each expert's F.linear anyway.
    gate_up = torch.stack([expert.gate_up.weight.to(dtype) for expert in swiglus]).transpose(-2, -1)
    down = torch.stack([expert.down.weight.to(dtype) for expert in swiglus]).transpose(-2, -1)
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    hidden = _GROUPED_MM(rows.to(dtype), gate_up, offs=offsets)
    return _GROUPED_MM(swiglu(hidden, swiglus[0].hidden), down, offs=offsets)


def _swiglu_experts(experts: nn.ModuleList) -> list[SwiGLUExpert]:
    return [cast(SwiGLUExpert, expert) for expert in experts]


@torch.compiler.disable  # reads the counts back to split the rows: runs eagerly, a graph break per MoE layer
def _looped_experts(rows: Tensor, counts: Tensor, experts: nn.ModuleList) -> Tensor:
    blocks = rows.split(counts.tolist())
    return torch.cat([expert(block) for expert, block in zip(experts, blocks)])


class _ExchangeRows(torch.autograd.Function):
    """all_to_all_single with variable splits; its gradient goes back the same way, splits swapped."""

    @staticmethod
    def forward(ctx, rows: Tensor, send: list[int], receive: list[int], group) -> Tensor:
        ctx.send, ctx.receive, ctx.group = send, receive, group
        received = rows.new_empty((sum(receive), rows.shape[1]))
        torch.distributed.all_to_all_single(
            received, rows.contiguous(), output_split_sizes=receive, input_split_sizes=send, group=group
        )
        return received

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _ExchangeRows.apply(grad.contiguous(), ctx.receive, ctx.send, ctx.group), None, None, None


@torch.compiler.disable  # data-dependent row counts per rank: runs eagerly, between compiled graphs
def _expert_parallel_experts(rows: Tensor, counts: Tensor, moe_layer: DeepSpeedModule) -> Tensor:
    """Send each sorted row to the rank holding its expert, run the local experts, send results back."""
    group, ep_size, local = moe_layer.ep_group, moe_layer.ep_size, moe_layer.num_local_experts
    if group is None:
        raise RuntimeError(
            "an MoE layer with ep_size > 1 has no expert-parallel group: build it through deepspeed.initialize "
            "(which calls set_deepspeed_parallelism) after deepspeed.init_distributed"
        )
    # counts_from[r, j]: rows rank r sends to this rank's local expert j.
    counts_from = torch.empty_like(counts)
    torch.distributed.all_to_all_single(counts_from, counts, group=group)
    counts_from = counts_from.view(ep_size, local)
    send, receive = torch.stack([counts.view(ep_size, local).sum(1), counts_from.sum(1)]).tolist()  # the sync
    received = _ExchangeRows.apply(rows, send, receive, group)
    # Received rows come grouped by source rank, then local expert: regroup them by local expert.
    local_expert = torch.arange(local, device=rows.device).repeat(ep_size)
    expert_of_row = local_expert.repeat_interleave(counts_from.reshape(-1), output_size=sum(receive))
    order = torch.argsort(expert_of_row, stable=True)
    results = run_experts(received.index_select(0, order), counts_from.sum(0), moe_layer.experts.deepspeed_experts)
    return _ExchangeRows.apply(results.index_select(0, inverse_permutation(order)), receive, send, group)


def grouped_forward(moe_layer: DeepSpeedModule, hidden_states: Tensor) -> tuple[Tensor, Routes]:
    """The forward of DeepSpeed's ``MOELayer`` (``MoE.deepspeed_moe``) without capacity or padding.

    Returns the output, shaped as ``hidden_states``, and the routes (aux loss, counts, logits).
    """
    tokens = hidden_states.reshape(-1, hidden_states.shape[-1])
    routes = route(moe_layer.gate, tokens)
    num_tokens, k = routes.experts.shape
    # Stable: within an expert, rows keep token order (as GShard's capacity slots do).
    order = torch.argsort(routes.experts.reshape(-1), stable=True)
    # Each token once per route, then permuted: every gradient write lands on its own row.
    copies = tokens.unsqueeze(1).expand(num_tokens, k, tokens.shape[1]).reshape(num_tokens * k, -1)
    rows = copies.index_select(0, order).to(compute_dtype(tokens))
    if moe_layer.ep_size > 1:
        results = _expert_parallel_experts(rows, routes.expert_counts, moe_layer)
    else:
        results = run_experts(rows, routes.expert_counts, moe_layer.experts.deepspeed_experts)
    routed = results.index_select(0, inverse_permutation(order)).view(num_tokens, k, -1)
    # fp32 products and sum over routes in route order, as DeepSpeed's _sparse_decode.
    combined = (routed * routes.weights.unsqueeze(-1)).sum(1).to(results.dtype)
    return combined.reshape(hidden_states.shape), routes
