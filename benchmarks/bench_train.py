"""Training throughput: plain PyTorch against the DeepSpeed engine, and MoE against dense.

One run, same model, same batches, same optimizer (AdamW, clipping):
  1. dense model, plain PyTorch loop            -> tokens/s, MFU
  2. dense model, DeepSpeed engine (our trainer) -> tokens/s, MFU, overhead vs 1
  3. MoE (E experts, top-k) on the engine, once per --dispatch (gshard: DeepSpeed's capacity-padded
     dispatch; grouped: dropless grouped GEMMs, docs/moe.md), against a dense model with the same
     active parameters (FFN hidden = k x expert hidden) -> cost per token relative to that dense model,
     and the top kernels of one MoE step (torch.profiler)

    python benchmarks/bench_train.py                       # CPU defaults (DS_ACCELERATOR=cpu)
    python benchmarks/bench_train.py --preset 350m --seq-len 1024 --batch 16   # on a GPU (bf16)

MFU = training FLOPs per token (upcycling.model.flops, active parameters + attention) x tokens/s / peak.
Peak: a known GPU's bf16 dense peak, or --peak-flops (on CPU there is no standard figure).
Per model: peak GPU memory, and with --compile torch.compile's graph breaks and the graphs compiled
during the timed steps (recompiles), from torch._dynamo's own counters.
--check exits non-zero when the engine overhead exceeds 15% or an MoE costs over 2x per token.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable

import torch
from torch._dynamo.utils import counters
from torch.nn.attention import SDPBackend, sdpa_kernel

from upcycling.model.flops import ModelConfig, count_params, train_flops_per_token
from upcycling.model.transformer import MoEOptions, Transformer
from upcycling.train import distributed
from upcycling.train.loop import build_engine, peak_flops

SDPA_CUDNN_FIRST = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]
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


def training_config(args, compile_model: bool) -> dict:
    return {
        "micro_batch_size": args.batch,
        "grad_accum_steps": 1,
        "grad_clip": 1.0,
        "zero_stage": args.zero,
        "precision": "auto",
        "lr": 3e-4,
        "weight_decay": 0.1,
        "adam_betas": [0.9, 0.95],
        "compile": compile_model,
    }


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def plain_stepper(cfg: ModelConfig, compile_model: bool, loss_chunk_rows: int | None):
    """The same model and optimizer in a plain PyTorch loop, in the precision the engine uses:
    fp32 weights under bf16 autocast with a fused AdamW on GPU, fp32 on CPU."""
    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    model = Transformer(cfg, loss_chunk_rows=loss_chunk_rows).to("cuda" if cuda else "cpu")
    if compile_model:
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


def engine_stepper(cfg: ModelConfig, args, device, compile_model: bool, moe: MoEOptions | None = None):
    torch.manual_seed(0)
    model = Transformer(cfg, moe, loss_chunk_rows=args.loss_chunk_rows)
    engine = build_engine(model, training_config(args, compile_model), device)

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


def compiled_graphs() -> int:
    return counters["stats"]["unique_graphs"]


def graph_breaks() -> int:
    return sum(counters["graph_break"].values())


def allocated() -> int:
    return torch.cuda.memory_allocated() if torch.cuda.is_available() else 0


def interleaved_best(steppers: dict, resident: dict[str, int], data, warmup: int, rounds: int) -> dict[str, dict]:
    """Per variant: best time over rounds that alternate the variants (so that load from elsewhere
    on the machine hits every variant alike), peak GPU memory, and torch.compile's counters.

    Peak memory of a variant: what its engine holds (``resident``, measured as it was built) plus
    the most its steps allocate above what every engine holds, i.e. as if it ran alone."""
    stats = {}
    for name, step in steppers.items():
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        graphs, breaks, before = compiled_graphs(), graph_breaks(), allocated()
        time_steps(step, data[:warmup])
        peak_bytes = torch.cuda.max_memory_allocated() - before + resident[name] if torch.cuda.is_available() else None
        stats[name] = {
            "seconds": float("inf"),
            "peak_memory_gib": peak_bytes / 2**30 if peak_bytes is not None else None,
            "graphs_compiled_in_warmup": compiled_graphs() - graphs,
            "graph_breaks": graph_breaks() - breaks,
            "recompiles": 0,
        }
    for _ in range(rounds):
        for name, step in steppers.items():
            graphs = compiled_graphs()
            stats[name]["seconds"] = min(stats[name]["seconds"], time_steps(step, data[warmup:]))
            stats[name]["recompiles"] += compiled_graphs() - graphs  # a graph made after warm-up
    return stats


def top_kernels(step: Callable, data, count: int = 12) -> list[dict]:
    """The kernels (CUDA) or operators (CPU) that take the most self time over a few steps."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as profiler:
        time_steps(step, data)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = sorted(profiler.key_averages(), key=lambda event: getattr(event, key), reverse=True)
    total = sum(getattr(event, key) for event in events) or 1.0
    return [
        {"name": event.key[:90], "self_ms": getattr(event, key) / 1e3, "share": getattr(event, key) / total}
        for event in events[:count]
    ]


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
    parser.add_argument(
        "--dispatch", default="gshard,grouped", help="MoE dispatches to time, comma-separated (moe.dispatch)"
    )
    parser.add_argument("--profile-steps", type=int, default=2, help="MoE steps under torch.profiler (0: none)")
    parser.add_argument("--skip-plain", action="store_true")
    parser.add_argument("--only", choices=["dense", "moe"], help="time only the dense pair or only the MoE pair")
    parser.add_argument("--compile", action="store_true", help="torch.compile the models (training.compile)")
    parser.add_argument(
        "--eager", default="", help="variants that stay eager under --compile, e.g. moe_gshard (its graph breaks)"
    )
    parser.add_argument(
        "--sdpa-cudnn-first",
        action="store_true",
        help="a lever to measure: SDPA tries cuDNN attention before flash (Hopper); the model's default is torch's",
    )
    parser.add_argument(
        "--loss-chunk-rows",
        type=int,
        help="a lever to measure: the LM head and loss in chunks of this many rows (model/loss.py); default plain",
    )
    parser.add_argument("--peak-flops", type=float, help="peak FLOP/s for MFU (default: known GPUs only)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--check", action="store_true", help="fail past the targets (15%% overhead, MoE 2x)")
    args = parser.parse_args()
    if args.peak_flops:
        os.environ["UPCYCLING_PEAK_FLOPS"] = str(args.peak_flops)

    device = distributed.init()
    if args.compile:
        # The models here share Transformer.forward's code: without this, compiling one after another
        # lets dynamo turn shapes dynamic and recompile, which a training job (one model) never sees.
        torch._dynamo.config.automatic_dynamic_shapes = False
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

    eager = set(filter(None, args.eager.split(",")))
    dispatches = [name for name in args.dispatch.split(",") if name] if args.only != "dense" else []
    makers: dict[str, Callable] = {}
    if args.only != "moe":
        makers["dense_engine"] = lambda compile_model: engine_stepper(dense, args, device, compile_model)
        if not args.skip_plain:
            makers["dense_plain"] = lambda compile_model: plain_stepper(dense, compile_model, args.loss_chunk_rows)
    if dispatches:
        makers["dense_same_active"] = lambda compile_model: engine_stepper(
            dense_same_active, args, device, compile_model
        )
    for dispatch in dispatches:
        options = MoEOptions(drop_tokens=False, dispatch=dispatch)
        makers[f"moe_{dispatch}"] = lambda compile_model, options=options: engine_stepper(
            moe, args, device, compile_model, options
        )
    labels = {
        "dense_engine": ("dense, DeepSpeed engine", dense),
        "dense_plain": ("dense, plain PyTorch", dense),
        "dense_same_active": (f"dense, FFN {args.top_k}x (= MoE active)", dense_same_active),
        **{f"moe_{d}": (f"MoE E={args.experts} k={args.top_k}, {d}", moe) for d in dispatches},
    }

    results: dict = {"device": where, "preset": args.preset, "seq_len": args.seq_len, "batch": args.batch}
    if args.sdpa_cudnn_first:
        # On until the process exits, so that every model and compiled graph (traced after this) uses it.
        sdpa_kernel(SDPA_CUDNN_FIRST, set_priority=True).__enter__()
        results["sdpa_priority"] = [backend.name for backend in SDPA_CUDNN_FIRST]
    steppers, resident = {}, {}
    for name, make in makers.items():
        before = allocated()
        steppers[name] = make(args.compile and name not in eager)
        resident[name] = allocated() - before
    stats = interleaved_best(steppers, resident, data, args.warmup, args.rounds)

    def report(name: str) -> dict:
        label, cfg = labels[name]
        tokens_per_s = tokens / stats[name]["seconds"]
        mfu = train_flops_per_token(cfg) * tokens_per_s / peak if peak else None
        counts = count_params(cfg)
        row = {
            "tokens_per_s": tokens_per_s,
            "mfu": mfu,
            "params": counts.total,
            "active_params": counts.active,
            "compiled": args.compile and name not in eager,
            **{key: value for key, value in stats[name].items() if key != "seconds"},
        }
        memory = f"   peak mem {row['peak_memory_gib']:.1f} GiB" if row["peak_memory_gib"] is not None else ""
        mode = (
            f"   graph breaks {row['graph_breaks']}, recompiles {row['recompiles']}" if row["compiled"] else "   eager"
        )
        print(
            f"{label:<34} {tokens_per_s:>12,.0f} tok/s   MFU {f'{mfu:.1%}' if mfu else 'n/a':>6}   "
            f"params {counts.total / 1e6:.1f}M (active {counts.active / 1e6:.1f}M){memory}{mode}"
        )
        return row

    print(
        f"device: {where}; preset {args.preset} seq {args.seq_len} batch {args.batch}, best of {args.rounds} rounds "
        f"of {args.steps} steps"
    )
    results.update({name: report(name) for name in stats})
    if "dense_plain" in stats:
        results["engine_overhead"] = stats["dense_engine"]["seconds"] / stats["dense_plain"]["seconds"] - 1
        print(f"engine overhead vs plain PyTorch: {results['engine_overhead']:+.1%}")
    for dispatch in dispatches:
        name = f"moe_{dispatch}"
        cost = stats[name]["seconds"] / stats["dense_same_active"]["seconds"]
        results[name]["cost_per_token_vs_dense"] = cost
        print(f"{dispatch}: MoE cost per token vs dense with the same active params: {cost:.2f}x")
        if args.profile_steps:
            results[name]["top_kernels"] = top_kernels(steppers[name], data[: args.profile_steps])
            for kernel in results[name]["top_kernels"]:
                print(f"    {kernel['share']:>6.1%} {kernel['self_ms']:>9.2f} ms  {kernel['name']}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    if args.check:
        moe_costs = [results[f"moe_{dispatch}"]["cost_per_token_vs_dense"] for dispatch in dispatches]
        failed = results.get("engine_overhead", 0) > 0.15 or max(moe_costs, default=0) > 2.0
        return 1 if failed else 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
