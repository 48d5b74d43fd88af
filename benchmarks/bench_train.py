"""Training throughput: plain PyTorch against the DeepSpeed engine, and MoE against dense.

One run, same model, same batches, same optimizer (AdamW, clipping):
  1. dense model, plain PyTorch loop            -> tokens/s, MFU
  2. dense model, DeepSpeed engine (our trainer) -> tokens/s, MFU, overhead vs 1
  3. MoE (E experts, top-k) on the engine, against a dense model with the same active parameters
     (FFN hidden = k x expert hidden)            -> cost per token relative to that dense model

    python benchmarks/bench_train.py                       # CPU defaults (DS_ACCELERATOR=cpu)
    python benchmarks/bench_train.py --preset 350m --seq-len 1024 --batch 16   # on a GPU (bf16)

MFU = training FLOPs per token (upcycling.model.flops, active parameters + attention) x tokens/s / peak.
Peak: a known GPU's bf16 dense peak, or --peak-flops (on CPU there is no standard figure).
--check exits non-zero when the engine overhead exceeds 15% or the MoE costs over 2x per token.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from upcycling.model.flops import ModelConfig, count_params, train_flops_per_token
from upcycling.model.transformer import MoEOptions, Transformer
from upcycling.train import distributed
from upcycling.train.loop import build_engine, peak_flops

PRESETS = {  # d_model, n_layers, n_heads, ffn_hidden
    "cpu": (256, 4, 4, 688),
    "125m": (768, 12, 12, 2048),
    "350m": (1024, 24, 16, 2816),
}


def batches(vocab: int, seq_len: int, rows: int, count: int, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        windows = torch.randint(0, vocab, (rows, seq_len + 1), generator=generator)
        out.append((windows[:, :-1].to(device), windows[:, 1:].to(device)))
    return out


def training_config(args) -> dict:
    return {
        "micro_batch_size": args.batch,
        "grad_accum_steps": 1,
        "grad_clip": 1.0,
        "zero_stage": args.zero,
        "precision": "auto",
        "lr": 3e-4,
        "weight_decay": 0.1,
        "adam_betas": [0.9, 0.95],
        "compile": args.compile,
    }


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def plain_stepper(cfg: ModelConfig, args):
    """The same model and optimizer in a plain PyTorch loop, in the precision the engine uses:
    fp32 weights under bf16 autocast with a fused AdamW on GPU, fp32 on CPU."""
    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    model = Transformer(cfg).to("cuda" if cuda else "cpu")
    if args.compile:
        model.compile()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=cuda or None)

    def step(inputs, targets):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            _, loss, moe_loss = model(inputs, targets)
        (loss + moe_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def engine_stepper(cfg: ModelConfig, args, device, moe: MoEOptions | None = None):
    torch.manual_seed(0)
    engine = build_engine(Transformer(cfg, moe), training_config(args), device)

    def step(inputs, targets):
        _, loss, moe_loss = engine(inputs, targets)
        engine.backward(loss + moe_loss)
        engine.step()

    return step


def time_steps(step, data) -> float:
    synchronize()
    start = time.perf_counter()
    for inputs, targets in data:
        step(inputs, targets)
    synchronize()
    return time.perf_counter() - start


def interleaved_best(steppers: dict, data, warmup: int, rounds: int) -> dict[str, float]:
    """Best time of each variant over rounds that alternate them, so that load from elsewhere on
    the machine hits every variant alike instead of whichever ran during it."""
    for step in steppers.values():
        time_steps(step, data[:warmup])
    best = {name: float("inf") for name in steppers}
    for _ in range(rounds):
        for name, step in steppers.items():
            best[name] = min(best[name], time_steps(step, data[warmup:]))
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--zero", type=int, default=0)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--skip-plain", action="store_true")
    parser.add_argument("--only", choices=["dense", "moe"], help="time only the dense pair or only the MoE pair")
    parser.add_argument("--compile", action="store_true", help="torch.compile the models (training.compile)")
    parser.add_argument("--peak-flops", type=float, help="peak FLOP/s for MFU (default: known GPUs only)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--check", action="store_true", help="fail past the targets (15%% overhead, MoE 2x)")
    args = parser.parse_args()
    if args.peak_flops:
        os.environ["UPCYCLING_PEAK_FLOPS"] = str(args.peak_flops)

    device = distributed.init()
    d_model, n_layers, n_heads, ffn_hidden = PRESETS[args.preset]
    dense = ModelConfig(
        vocab_size=args.vocab,
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        ffn_hidden=ffn_hidden,
        seq_len=args.seq_len,
    )
    # MoE whose experts are each the dense FFN (upcycled shape), and the dense model with its
    # active parameters: FFN hidden = k x expert hidden.
    moe = ModelConfig(**{**dense.__dict__, "experts": args.experts, "top_k": args.top_k})
    dense_same_active = ModelConfig(**{**dense.__dict__, "ffn_hidden": args.top_k * ffn_hidden})
    data = batches(args.vocab, args.seq_len, args.batch, args.warmup + args.steps, device)
    tokens = args.steps * args.batch * args.seq_len  # per round
    peak = peak_flops()
    where = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"

    def report(name: str, cfg: ModelConfig, seconds: float) -> dict:
        tokens_per_s = tokens / seconds
        mfu = train_flops_per_token(cfg) * tokens_per_s / peak if peak else None
        counts = count_params(cfg)
        print(
            f"{name:<34} {tokens_per_s:>12,.0f} tok/s   MFU {f'{mfu:.1%}' if mfu else 'n/a':>6}   "
            f"params {counts.total / 1e6:.1f}M (active {counts.active / 1e6:.1f}M)"
        )
        return {"tokens_per_s": tokens_per_s, "mfu": mfu, "params": counts.total, "active_params": counts.active}

    print(
        f"device: {where}; preset {args.preset} seq {args.seq_len} batch {args.batch}, best of {args.rounds} rounds of {args.steps} steps"
    )
    results = {"device": where, "preset": args.preset, "seq_len": args.seq_len, "batch": args.batch}
    steppers = {}
    if args.only != "moe":
        steppers["dense_engine"] = engine_stepper(dense, args, device)
        if not args.skip_plain:
            steppers["dense_plain"] = plain_stepper(dense, args)
    if args.only != "dense":
        steppers["dense_same_active"] = engine_stepper(dense_same_active, args, device)
        steppers["moe_engine"] = engine_stepper(moe, args, device, MoEOptions(drop_tokens=False))
    seconds = interleaved_best(steppers, data, args.warmup, args.rounds)
    if "dense_engine" in seconds:
        results["dense_engine"] = report("dense, DeepSpeed engine", dense, seconds["dense_engine"])
    if "dense_plain" in seconds:
        results["dense_plain"] = report("dense, plain PyTorch", dense, seconds["dense_plain"])
        results["engine_overhead"] = seconds["dense_engine"] / seconds["dense_plain"] - 1
        print(f"engine overhead vs plain PyTorch: {results['engine_overhead']:+.1%}")
    if "moe_engine" in seconds:
        results["dense_same_active"] = report(
            f"dense, FFN {args.top_k}x (= MoE active)", dense_same_active, seconds["dense_same_active"]
        )
        results["moe_engine"] = report(f"MoE E={args.experts} k={args.top_k}, engine", moe, seconds["moe_engine"])
        results["moe_cost_per_token_vs_dense"] = seconds["moe_engine"] / seconds["dense_same_active"]
        print(f"MoE cost per token vs dense with the same active params: {results['moe_cost_per_token_vs_dense']:.2f}x")
    if torch.cuda.is_available():
        results["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        print(f"peak GPU memory (all models of this run): {results['peak_memory_gib']:.1f} GiB")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    if args.check:
        failed = results.get("engine_overhead", 0) > 0.15 or results.get("moe_cost_per_token_vs_dense", 0) > 2.0
        return 1 if failed else 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
