"""Parameter and FLOP counts of the dense and MoE models, as pure functions of their config.

Conventions (tested against the modules in tests/unit/test_model.py):
- Embeddings are untied: an input embedding and an LM head, each vocab x d_model.
- ``non_embedding`` excludes both (Kaplan et al.'s N); ``total`` includes both.
- ``active`` counts what one token uses: every non-expert weight, the router, and k experts.
- Training FLOPs per token = 6 x (active matmul weights) + 12 x n_layers x seq_len x attn_width, the
  second term being attention scores and values (attn_width = n_heads x head_dim, d_model unless a
  width-grown model has more heads) (PaLM appendix B; counted as non-causal, as
  nanoGPT and most MFU reports do). The input embedding is a lookup and costs no FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass

# A DeepSpeed checkpoint: the module's weights (bf16 on GPU, fp32 on CPU) plus the optimizer's fp32
# master weights (bf16 only) and two Adam moments. The plan sizes checkpoints with it, and the
# trainer the space a save needs.
CHECKPOINT_BYTES_PER_PARAM = {"bf16": 2 + 12, "fp32": 4 + 8}


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    ffn_hidden: int
    seq_len: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    # Mixture of experts; experts == 1 is the dense model.
    experts: int = 1
    top_k: int = 1
    granularity: int = 1  # each expert holds ffn_hidden / granularity hidden units
    # None: d_model // n_heads. Set where heads were added without widening the residual stream
    # (grow_width in stage2.py), so n_heads x head_dim exceeds d_model.
    explicit_head_dim: int | None = None

    @property
    def is_moe(self) -> bool:
        return self.experts > 1

    @property
    def head_dim(self) -> int:
        return self.explicit_head_dim or self.d_model // self.n_heads

    @property
    def attn_width(self) -> int:
        """Rows of each of q, k, v; columns of the attention output projection."""
        return self.n_heads * self.head_dim

    @property
    def expert_hidden(self) -> int:
        return self.ffn_hidden // self.granularity if self.is_moe else self.ffn_hidden


@dataclass(frozen=True)
class ParamCounts:
    total: int
    active: int
    non_embedding: int
    active_non_embedding: int
    embedding: int


def count_params(cfg: ModelConfig) -> ParamCounts:
    d = cfg.d_model
    embedding = 2 * cfg.vocab_size * d  # input embedding + untied LM head
    attention = 4 * d * cfg.attn_width
    norms = 2 * d
    ffn_one = 3 * d * cfg.expert_hidden  # SwiGLU: gate, up, down
    if cfg.is_moe:
        router = d * cfg.experts
        layer_total = attention + norms + router + cfg.experts * ffn_one
        layer_active = attention + norms + router + cfg.top_k * ffn_one
    else:
        layer_total = layer_active = attention + norms + ffn_one
    final_norm = d
    non_embedding = cfg.n_layers * layer_total + final_norm
    active_non_embedding = cfg.n_layers * layer_active + final_norm
    return ParamCounts(
        total=non_embedding + embedding,
        active=active_non_embedding + embedding,
        non_embedding=non_embedding,
        active_non_embedding=active_non_embedding,
        embedding=embedding,
    )


def train_flops_per_token(cfg: ModelConfig) -> float:
    """Forward + backward FLOPs for one token (see module docstring)."""
    d = cfg.d_model
    counts = count_params(cfg)
    norm_weights = (2 * cfg.n_layers + 1) * d  # elementwise, not matmuls
    matmul_weights = counts.active_non_embedding - norm_weights + cfg.vocab_size * d  # + LM head
    attention = 12 * cfg.n_layers * cfg.seq_len * cfg.attn_width
    return 6.0 * matmul_weights + attention
