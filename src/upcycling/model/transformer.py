"""A Llama-like decoder (RMSNorm, rotary embeddings, SwiGLU, no biases) and its Mixtral-like MoE.

The MoE replaces every layer's FFN with ``deepspeed.moe.layer.MoE`` (top-k routing, load-balancing
loss); each expert is the same ``SwiGLU`` module as the dense FFN, so upcycling is a weight copy.
``moe.dispatch`` picks the layer's forward: DeepSpeed's GShard one, or the dropless grouped-GEMM one
of ``moe_dispatch.py`` over the same modules (docs/moe.md).
Weight names follow the module tree; ``export.py`` maps them to the Hugging Face layouts.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from upcycling.core.errors import InputError
from upcycling.model.flops import ModelConfig
from upcycling.model.loss import chunked_linear_cross_entropy, plain_cross_entropy
from upcycling.model.moe_dispatch import grouped_forward, swiglu

# Where DeepSpeed-MoE (deepspeed.moe.layer.MoE) keeps a block's router and experts, spelled once:
# export, upcycling and the expert-parallel gather and scatter name weights through these.
_MOE = "ffn.moe.deepspeed_moe"
EXPERTS_MARKER = ".experts.deepspeed_experts."
ROUTER_LEAF = ".gate.wg.weight"


def router_weight_name(layer: int) -> str:
    return f"blocks.{layer}.{_MOE}{ROUTER_LEAF}"


def expert_weight_name(layer: int, expert: int, leaf: str) -> str:
    """``leaf``: ``gate_up.weight`` or ``down.weight`` of the expert's SwiGLU."""
    return f"blocks.{layer}.{_MOE}{EXPERTS_MARKER}{expert}.{leaf}"


def split_expert_name(name: str) -> tuple[str, int, str] | None:
    """(prefix, expert index, leaf) of an expert weight's name; None for any other weight."""
    if EXPERTS_MARKER not in name:
        return None
    prefix, tail = name.split(EXPERTS_MARKER)
    expert, leaf = tail.split(".", 1)
    return prefix, int(expert), leaf


def join_expert_name(prefix: str, expert: int, leaf: str) -> str:
    return f"{prefix}{EXPERTS_MARKER}{expert}.{leaf}"


@dataclass(frozen=True)
class MoEOptions:
    """How the MoE layers route and train; irrelevant for a dense model."""

    capacity_factor: float = 1.25
    drop_tokens: bool = False
    ep_size: int = 1
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0
    router_init_std: float = 0.02
    # gshard: DeepSpeed's capacity-padded dispatch; grouped: dropless grouped GEMMs (moe_dispatch.py).
    # None: grouped without token dropping, gshard with it.
    dispatch: str | None = None

    def __post_init__(self):
        if self.dispatch not in (None, "gshard", "grouped"):
            raise InputError(f"moe.dispatch is {self.dispatch!r}: use gshard or grouped (or leave it unset)")
        if self.dispatch == "grouped" and self.drop_tokens:
            raise InputError(
                "moe.dispatch grouped never drops tokens but moe.drop_tokens is true: set moe.drop_tokens: false, "
                "or moe.dispatch: gshard for GShard's capacity limit"
            )

    @property
    def grouped(self) -> bool:
        """Whether the layers run the grouped dispatch."""
        return self.dispatch == "grouped" or (self.dispatch is None and not self.drop_tokens)

    @classmethod
    def from_settings(cls, settings: dict | None) -> MoEOptions:
        """From the sweep's ``moe`` section (its other keys, e.g. copy_optimizer_state, are not
        about the layers)."""
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in (settings or {}).items() if key in names})


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 as Llama does, so bf16 training matches the exported model.
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


def rotary_tables(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables in the Hugging Face Llama convention (halves rotated, not interleaved)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.head_dim
        self.attn_width = cfg.attn_width  # d_model, unless grown heads make it wider
        # One fused projection for q, k and v: one GEMM instead of three.
        self.qkv = nn.Linear(cfg.d_model, 3 * self.attn_width, bias=False)
        self.out = nn.Linear(self.attn_width, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        q, k, v = self.qkv(x).view(batch, seq, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        # SDPA picks flash / memory-efficient kernels on GPU.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(batch, seq, self.attn_width))


class SwiGLU(nn.Module):
    """The dense FFN, and each expert of the MoE. gate_up holds [gate; up] row blocks."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.gate_up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(swiglu(self.gate_up(x), self.hidden))


class MoEFeedForward(nn.Module):
    """DeepSpeed-MoE layer around SwiGLU experts; keeps its losses and expert counts for the trainer."""

    def __init__(self, cfg: ModelConfig, options: MoEOptions):
        super().__init__()
        from deepspeed.moe.layer import MoE  # deferred: importing DeepSpeed costs seconds

        self.moe = MoE(
            hidden_size=cfg.d_model,
            expert=SwiGLU(cfg.d_model, cfg.expert_hidden),
            num_experts=cfg.experts,
            ep_size=options.ep_size,
            k=cfg.top_k,
            capacity_factor=options.capacity_factor,
            eval_capacity_factor=options.capacity_factor,
            min_capacity=4,
            drop_tokens=options.drop_tokens,
            # Mixtral routing: deterministic top-k, no random token selection, no noisy 2nd expert.
            use_rts=False,
            top2_2nd_expert_sampling=False,
        )
        self.z_loss_coef = options.z_loss_coef
        self.grouped = options.grouped
        self.aux_loss = torch.zeros(())
        self.z_loss = torch.zeros(())
        self.expert_counts = torch.zeros(cfg.experts)

    @property
    def router(self) -> nn.Linear:
        return self.moe.deepspeed_moe.gate.wg

    @property
    def experts(self) -> nn.ModuleList:
        return self.moe.deepspeed_moe.experts.deepspeed_experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grouped:
            out, routes = grouped_forward(self.moe.deepspeed_moe, x)
            aux_loss, counts, router_logits = routes.aux_loss, routes.expert_counts, routes.logits
        else:
            out, aux_loss, counts = self.moe(x)
            router_logits = None  # DeepSpeed's gate does not expose them
        self.aux_loss, self.expert_counts = aux_loss, counts.detach()
        if self.z_loss_coef > 0:
            if router_logits is None:
                router_logits = F.linear(x.reshape(-1, x.shape[-1]).float(), self.router.weight.float())
            # ST-MoE router z-loss: keeps router logits small.
            self.z_loss = torch.logsumexp(router_logits, dim=-1).square().mean()
        return out


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, moe_options: MoEOptions):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = MoEFeedForward(cfg, moe_options) if cfg.is_moe else SwiGLU(cfg.d_model, cfg.ffn_hidden)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    rope_cos: torch.Tensor  # buffers, typed for mypy
    rope_sin: torch.Tensor

    def __init__(self, cfg: ModelConfig, moe_options: MoEOptions | None = None, loss_chunk_rows: int | None = None):
        """loss_chunk_rows: take the LM head and loss in chunks of that many rows (model/loss.py; the
        forward then returns no logits when given targets); None: the plain loss."""
        super().__init__()
        self.cfg = cfg
        self.moe_options = moe_options or MoEOptions()
        self.loss_chunk_rows = loss_chunk_rows
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, self.moe_options) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        cos, sin = rotary_tables(cfg.seq_len, cfg.head_dim, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 style init; residual output projections scaled by 1/sqrt(2 n_layers).

        Every expert and router gets its own draw: DeepSpeed's MoE deep-copies one expert module,
        which would otherwise leave a from-scratch MoE with E identical experts.
        """
        std = 0.02
        residual_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(param)
            elif name.endswith(("out.weight", "down.weight")):
                nn.init.normal_(param, mean=0.0, std=residual_std)
            elif name.endswith(ROUTER_LEAF):
                nn.init.normal_(param, mean=0.0, std=self.moe_options.router_init_std)
            else:
                nn.init.normal_(param, mean=0.0, std=std)

    def moe_layers(self) -> list[MoEFeedForward]:
        return [block.ffn for block in self.blocks if isinstance(block.ffn, MoEFeedForward)]

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None):
        """Returns (logits, lm_loss, moe_loss). Targets equal to -100 are ignored (budget padding).
        With loss_chunk_rows and targets, logits is None (they are never held whole)."""
        seq = input_ids.shape[1]
        cos, sin = self.rope_cos[:seq].to(self.embed.weight.dtype), self.rope_sin[:seq].to(self.embed.weight.dtype)
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x, cos, sin)
        hidden = self.norm(x)
        if targets is None:
            return self.lm_head(hidden), None, None
        flat_targets = targets.reshape(-1)
        logits: torch.Tensor | None
        if self.loss_chunk_rows:
            logits = None
            flat_hidden = hidden.reshape(-1, hidden.shape[-1])
            token_losses = chunked_linear_cross_entropy(
                flat_hidden, self.lm_head.weight, flat_targets, self.loss_chunk_rows
            )
        else:
            logits = self.lm_head(hidden)
            token_losses = plain_cross_entropy(logits.view(-1, logits.shape[-1]), flat_targets)
        # Mean over the targets that count; a micro-batch whose targets are all past the token
        # budget (-100) contributes 0 rather than NaN.
        lm_loss = token_losses / (flat_targets != -100).sum().clamp(min=1)
        moe_loss = torch.zeros((), device=hidden.device)
        for layer in self.moe_layers():
            moe_loss = moe_loss + self.moe_options.aux_loss_coef * layer.aux_loss
            if layer.z_loss_coef > 0:
                moe_loss = moe_loss + layer.z_loss_coef * layer.z_loss
        return logits, lm_loss, moe_loss
