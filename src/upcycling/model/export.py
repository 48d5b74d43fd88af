"""Portable checkpoints: our module state <-> Hugging Face Llama / Mixtral safetensors + config.json.

The export is the contract between stages outside the DeepSpeed engine: the dense stage exports
Llama, the upcycling stage reads it (so any Llama checkpoint in this layout can be upcycled) and
exports Mixtral, which the MoE stage loads as its initial weights. Mixtral's classic layout
(``block_sparse_moe.experts.{i}.w1/w2/w3``) is written: transformers 4.x reads it as is and 5.x
converts it on load.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from upcycling.core.errors import InputError
from upcycling.core.publish import sha256_file, staging_dir
from upcycling.model.flops import ModelConfig
from upcycling.model.transformer import expert_weight_name, router_weight_name

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
OPTIMIZER_FILE = "optimizer.safetensors"  # Adam moments by our parameter names, when asked for


def _layer_prefix(i: int) -> str:
    return f"model.layers.{i}"


def to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our full (all experts) state dict -> HF Llama (dense) or Mixtral (MoE) names and shapes."""
    hidden = cfg.expert_hidden
    hf = {
        "model.embed_tokens.weight": state["embed.weight"],
        "model.norm.weight": state["norm.weight"],
        "lm_head.weight": state["lm_head.weight"],
    }
    for i in range(cfg.n_layers):
        ours, theirs = f"blocks.{i}", _layer_prefix(i)
        q, k, v = state[f"{ours}.attn.qkv.weight"].split(cfg.attn_width, dim=0)
        hf[f"{theirs}.self_attn.q_proj.weight"] = q
        hf[f"{theirs}.self_attn.k_proj.weight"] = k
        hf[f"{theirs}.self_attn.v_proj.weight"] = v
        hf[f"{theirs}.self_attn.o_proj.weight"] = state[f"{ours}.attn.out.weight"]
        hf[f"{theirs}.input_layernorm.weight"] = state[f"{ours}.attn_norm.weight"]
        hf[f"{theirs}.post_attention_layernorm.weight"] = state[f"{ours}.ffn_norm.weight"]
        if cfg.is_moe:
            hf[f"{theirs}.block_sparse_moe.gate.weight"] = state[router_weight_name(i)]
            for e in range(cfg.experts):
                gate, up = state[expert_weight_name(i, e, "gate_up.weight")].split(hidden, dim=0)
                out = f"{theirs}.block_sparse_moe.experts.{e}"
                hf[f"{out}.w1.weight"], hf[f"{out}.w3.weight"] = gate, up
                hf[f"{out}.w2.weight"] = state[expert_weight_name(i, e, "down.weight")]
        else:
            gate, up = state[f"{ours}.ffn.gate_up.weight"].split(hidden, dim=0)
            hf[f"{theirs}.mlp.gate_proj.weight"], hf[f"{theirs}.mlp.up_proj.weight"] = gate, up
            hf[f"{theirs}.mlp.down_proj.weight"] = state[f"{ours}.ffn.down.weight"]
    return {name: tensor.detach().contiguous().clone() for name, tensor in hf.items()}


def from_hf(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Inverse of ``to_hf``: HF names -> our full state dict (all experts, no expert sharding)."""
    state = {
        "embed.weight": hf["model.embed_tokens.weight"],
        "norm.weight": hf["model.norm.weight"],
        "lm_head.weight": hf["lm_head.weight"],
    }
    for i in range(cfg.n_layers):
        ours, theirs = f"blocks.{i}", _layer_prefix(i)
        state[f"{ours}.attn.qkv.weight"] = torch.cat(
            [hf[f"{theirs}.self_attn.{p}_proj.weight"] for p in ("q", "k", "v")], dim=0
        )
        state[f"{ours}.attn.out.weight"] = hf[f"{theirs}.self_attn.o_proj.weight"]
        state[f"{ours}.attn_norm.weight"] = hf[f"{theirs}.input_layernorm.weight"]
        state[f"{ours}.ffn_norm.weight"] = hf[f"{theirs}.post_attention_layernorm.weight"]
        if cfg.is_moe:
            state[router_weight_name(i)] = hf[f"{theirs}.block_sparse_moe.gate.weight"]
            for e in range(cfg.experts):
                src = f"{theirs}.block_sparse_moe.experts.{e}"
                state[expert_weight_name(i, e, "gate_up.weight")] = torch.cat(
                    [hf[f"{src}.w1.weight"], hf[f"{src}.w3.weight"]]
                )
                state[expert_weight_name(i, e, "down.weight")] = hf[f"{src}.w2.weight"]
        else:
            state[f"{ours}.ffn.gate_up.weight"] = torch.cat(
                [hf[f"{theirs}.mlp.gate_proj.weight"], hf[f"{theirs}.mlp.up_proj.weight"]]
            )
            state[f"{ours}.ffn.down.weight"] = hf[f"{theirs}.mlp.down_proj.weight"]
    return state


def hf_config(cfg: ModelConfig, extra: dict | None = None) -> dict:
    common = {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "attention_bias": False,
        "torch_dtype": "float32",
    }
    if cfg.is_moe:
        common.update(
            {
                "architectures": ["MixtralForCausalLM"],
                "model_type": "mixtral",
                "intermediate_size": cfg.expert_hidden,
                "num_local_experts": cfg.experts,
                "num_experts_per_tok": cfg.top_k,
                "router_jitter_noise": 0.0,
                "output_router_logits": False,
            }
        )
    else:
        common.update(
            {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "intermediate_size": cfg.ffn_hidden,
                "mlp_bias": False,
            }
        )
    # Ours, for reading back: granularity is not a Hugging Face notion.
    common["upcycling"] = {"granularity": cfg.granularity, "dense_ffn_hidden": cfg.ffn_hidden, **(extra or {})}
    return common


def config_from_hf(hf_cfg: dict) -> ModelConfig:
    ours = hf_cfg.get("upcycling", {})
    is_moe = hf_cfg.get("model_type") == "mixtral"
    hidden, heads, head_dim = hf_cfg["hidden_size"], hf_cfg["num_attention_heads"], hf_cfg.get("head_dim")
    return ModelConfig(
        vocab_size=hf_cfg["vocab_size"],
        d_model=hf_cfg["hidden_size"],
        n_layers=hf_cfg["num_hidden_layers"],
        n_heads=hf_cfg["num_attention_heads"],
        ffn_hidden=ours.get("dense_ffn_hidden", hf_cfg["intermediate_size"]),
        seq_len=hf_cfg["max_position_embeddings"],
        rope_theta=hf_cfg.get("rope_theta", 10000.0),
        norm_eps=hf_cfg.get("rms_norm_eps", 1e-5),
        experts=hf_cfg.get("num_local_experts", 1) if is_moe else 1,
        top_k=hf_cfg.get("num_experts_per_tok", 1) if is_moe else 1,
        granularity=ours.get("granularity", 1) if is_moe else 1,
        explicit_head_dim=head_dim if head_dim not in (None, hidden // heads) else None,
    )


def save_hf(
    state: dict[str, torch.Tensor],
    cfg: ModelConfig,
    out_dir: Path,
    extra: dict | None = None,
    adam_moments: tuple[dict, dict, int] | None = None,
) -> str:
    """Write model.safetensors + config.json (+ the Adam moments, if given) into out_dir,
    atomically (a staged directory, then one rename). config.json records the weights' sha256 (the
    export's fingerprint, checked on load); returns it."""
    with staging_dir(out_dir) as staged:
        save_file(to_hf(state, cfg), str(staged / WEIGHTS_FILE), metadata={"format": "pt"})
        weights_sha256 = sha256_file(staged / WEIGHTS_FILE)
        (staged / CONFIG_FILE).write_text(
            json.dumps(hf_config(cfg, {**(extra or {}), "weights_sha256": weights_sha256}), indent=2)
        )
        if adam_moments is not None:
            exp_avg, exp_avg_sq, step = adam_moments
            tensors = {
                **{f"exp_avg/{n}": t.contiguous() for n, t in exp_avg.items()},
                **{f"exp_avg_sq/{n}": t.contiguous() for n, t in exp_avg_sq.items()},
            }
            save_file(tensors, str(staged / OPTIMIZER_FILE), metadata={"step": str(step)})
    return weights_sha256


class CheckpointError(InputError):
    """An unreadable or mismatched checkpoint; the message names the file and the fix."""


def load_hf(model_dir: Path) -> tuple[dict[str, torch.Tensor], ModelConfig, dict]:
    """Read an HF Llama/Mixtral export -> (our state dict, ModelConfig, raw config.json)."""
    model_dir = Path(model_dir)
    weights, config_path = model_dir / WEIGHTS_FILE, model_dir / CONFIG_FILE
    for path in (weights, config_path):
        if not path.is_file():
            raise CheckpointError(f"checkpoint {model_dir}: {path.name} is missing: rerun the stage that writes it")
    try:
        raw_cfg = json.loads(config_path.read_text())
        cfg = config_from_hf(raw_cfg)
    except (json.JSONDecodeError, KeyError) as exc:
        raise CheckpointError(f"checkpoint {config_path} is not a Llama/Mixtral config.json ({exc!r})") from exc
    expected = raw_cfg.get("upcycling", {}).get("weights_sha256")
    if expected is not None and sha256_file(weights) != expected:
        raise CheckpointError(
            f"checkpoint {weights} does not match the sha256 its config.json records: it is "
            "corrupt or truncated; delete its directory and rerun the stage that writes it"
        )
    try:
        hf = load_file(str(weights))
    except Exception as exc:  # safetensors raises several types for a truncated/corrupt file
        raise CheckpointError(
            f"checkpoint {weights} cannot be read ({exc}): it is corrupt or truncated; "
            "delete it and rerun the stage that writes it"
        ) from exc
    try:
        return from_hf(hf, cfg), cfg, raw_cfg
    except KeyError as exc:
        raise CheckpointError(f"checkpoint {weights} lacks tensor {exc} expected by its config.json") from exc


def load_adam_moments(model_dir: Path) -> tuple[dict, dict, int] | None:
    """(exp_avg, exp_avg_sq, step) saved beside an export, or None where there are none."""
    path = Path(model_dir) / OPTIMIZER_FILE
    if not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        step = int(handle.metadata()["step"])
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (a safetensors handle, not a dict)
    exp_avg = {key.split("/", 1)[1]: t for key, t in tensors.items() if key.startswith("exp_avg/")}
    exp_avg_sq = {key.split("/", 1)[1]: t for key, t in tensors.items() if key.startswith("exp_avg_sq/")}
    return exp_avg, exp_avg_sq, step
