#!/usr/bin/env bash
# The GPU check: on a machine with a CUDA GPU, install what is missing, run the gpu test tier and
# the training benchmarks, and write a short report (results/gpu-check/report.md, or
# $GPU_CHECK_OUT/report.md). At most 6 minutes on one H100/H200: no benchmark starts, and none runs,
# past GPU_CHECK_BUDGET_S (default 330 s from the start), and the report names what that cut.
# Without CUDA it says so and exits 0.
#
#   bash scripts/gpu-check.sh                # the whole check
#   GPU_CHECK_QUICK=1 bash scripts/gpu-check.sh   # the benchmarks with fewer steps
#
# Installing: scripts/gpu-env.sh (nothing when the package, DeepSpeed and Snakemake import).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${GPU_CHECK_OUT:-results/gpu-check}
python=${PYTHON:-python3}

if ! "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu-check: no CUDA GPU here (torch.cuda.is_available() is false): nothing to check, the gpu tier and"
  echo "gpu-check: the GPU benchmarks need one. On a GPU machine: bash scripts/gpu-check.sh"
  exit 0
fi
mkdir -p "$out"
started=$(date +%s)

source scripts/gpu-env.sh
"$python" -c "import torch, deepspeed; print(f'gpu-check: {torch.cuda.get_device_name()}, torch {torch.__version__}, deepspeed {deepspeed.__version__}')" \
  | tee "$out/versions.txt"

# 1. The gpu test tier.
"$python" -m pytest -m gpu -p no:cacheprovider -q -rA --timeout 300 tests/gpu 2>&1 | tee "$out/gpu-tests.log"
tests_status=${PIPESTATUS[0]}

# 2. The benchmarks, seq 1024, bf16, torch.compile on (training.compile: true in config/paper.yaml):
#    the E=8 top-2 MoE made of the ~350M's FFN with both dispatches (against the dense model with the
#    same active parameters; top kernels of each MoE step from torch.profiler), then dense ~350M and
#    ~125M. Most valuable first, so that the budget cuts the least valuable.
steps=${GPU_CHECK_STEPS:-6}; rounds=2
[ -n "${GPU_CHECK_QUICK:-}" ] && { steps=3; rounds=1; }
budget=${GPU_CHECK_BUDGET_S:-330}
: > "$out/skipped.txt"
# The grouped dispatch's own GPU tests (grouped_mm in bf16 against the loop and against gshard).
"$python" -m pytest -m gpu -p no:cacheprovider -q -rA --timeout 120 tests/unit/test_moe_grouped.py 2>&1 \
  | tee "$out/moe-grouped-tests.log" | tail -3
[ "${PIPESTATUS[0]}" -eq 0 ] || tests_status=1
bench() {  # name, then bench_train.py arguments
  local name=$1; shift
  local left=$(( budget - ($(date +%s) - started) ))
  if [ "$left" -lt 30 ]; then echo "$name" >> "$out/skipped.txt"; echo "gpu-check: $name skipped (budget)"; return; fi
  timeout "$left" "$python" benchmarks/bench_train.py --seq-len 1024 --vocab 32768 --steps "$steps" \
    --rounds "$rounds" --warmup 2 --compile --skip-plain --json "$out/$name.json" "$@" 2>&1 \
    | tee "$out/$name.log" | grep -v "^\[" || true
  [ -f "$out/$name.json" ] || echo "$name (failed or cut by the budget: $out/$name.log)" >> "$out/skipped.txt"
}
# gshard stays eager: its per-layer host sync breaks the graph (the README's old figure is eager too).
bench moe-350m-e8k2 --preset 350m --batch 8 --only moe --experts 8 --top-k 2 --dispatch gshard,grouped --eager moe_gshard
bench dense-350m --preset 350m --batch 16 --only dense
bench dense-125m --preset 125m --batch 16 --only dense
# Dense-path levers, measured where the budget leaves time (the model's defaults stay until they pay).
bench dense-350m-sdpa-cudnn --preset 350m --batch 16 --only dense --sdpa-cudnn-first
bench dense-350m-chunked-loss --preset 350m --batch 16 --only dense --loss-chunk-rows 4096

# 3. The report.
"$python" - "$out" "$tests_status" "$started" <<'EOF'
import json, sys, time
from pathlib import Path

out, tests_status, started = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
lines = [f"# GPU check: {(out / 'versions.txt').read_text().strip().removeprefix('gpu-check: ')}", ""]
log = (out / "gpu-tests.log").read_text()
summary = [line for line in log.splitlines() if " passed" in line or " failed" in line or " error" in line]
lines += [f"gpu test tier: {'passed' if tests_status == 0 else 'FAILED'} ({summary[-1].strip('= ') if summary else 'no summary'})", ""]
lines += ["| benchmark | tokens/s | MFU | cost/token vs equal-active dense | params (active) | peak GPU memory | graph breaks, recompiles |",
          "|---|---|---|---|---|---|---|"]
results = {path.stem: json.loads(path.read_text()) for path in sorted(out.glob("*.json"))}
labels = (("dense_engine", "dense"), ("dense_same_active", "dense with the MoE's active params"),
          ("moe_gshard", "MoE E=8 top-2, gshard"), ("moe_grouped", "MoE E=8 top-2, grouped"))
for stem, result in results.items():
    for key, label in labels:
        if key in result:
            row = result[key]
            mfu = f"{row['mfu']:.1%}" if row.get("mfu") else "n/a"
            cost = f"{row['cost_per_token_vs_dense']:.2f}x" if "cost_per_token_vs_dense" in row else ""
            memory = f"{row['peak_memory_gib']:.1f} GiB" if row.get("peak_memory_gib") is not None else "n/a"
            label += "" if row.get("compiled") else " (eager)"
            lines.append(f"| {stem}: {label} | {row['tokens_per_s']:,.0f} | {mfu} | {cost} | "
                         f"{row['params'] / 1e6:,.0f}M ({row['active_params'] / 1e6:,.0f}M) | {memory} | "
                         f"{row.get('graph_breaks', 'n/a')}, {row.get('recompiles', 'n/a')} |")
targets = []
moe = results.get("moe-350m-e8k2", {}).get("moe_grouped")
if moe:
    met = (moe.get("mfu") or 0) >= 0.35 and moe["cost_per_token_vs_dense"] <= 1.3
    targets.append(f"- MoE grouped >= 35% MFU and <= 1.3x cost per token: {'met' if met else 'MISSED'} "
                   f"({(moe.get('mfu') or 0):.1%}, {moe['cost_per_token_vs_dense']:.2f}x)")
dense = results.get("dense-350m", {}).get("dense_engine")
if dense:
    targets.append(f"- dense ~350M >= 45% MFU compiled: {'met' if (dense.get('mfu') or 0) >= 0.45 else 'MISSED'} "
                   f"({(dense.get('mfu') or 0):.1%})")
for stem, lever_name in (("dense-350m-sdpa-cudnn", "SDPA cuDNN attention first"), ("dense-350m-chunked-loss", "chunked LM-head loss")):
    lever = results.get(stem, {}).get("dense_engine")
    if dense and lever:
        targets.append(f"- lever, {lever_name} (dense ~350M): {lever['tokens_per_s'] / dense['tokens_per_s'] - 1:+.1%} tokens/s, "
                       f"peak memory {lever['peak_memory_gib']:.1f} vs {dense['peak_memory_gib']:.1f} GiB")
lines += ["", "Targets (H100/H200, seq 1024, bf16):", *(targets or ["- none measured"])]
for key in ("moe_gshard", "moe_grouped"):
    kernels = results.get("moe-350m-e8k2", {}).get(key, {}).get("top_kernels")
    if kernels:
        lines += ["", f"Top kernels of the {key.removeprefix('moe_')} MoE step (self GPU time):"]
        lines += [f"- {k['share']:.1%} {k['self_ms']:.1f} ms {k['name']}" for k in kernels[:8]]
skipped = [line for line in (out / "skipped.txt").read_text().splitlines() if line]
if skipped:
    lines += ["", "Not measured (budget or failure): " + "; ".join(skipped)]
lines += ["", "MFU: training FLOPs per token (6 x active matmul weights + attention) x tokens/s / bf16 peak.",
          f"Wall time of the check: {time.time() - started:.0f} s."]
(out / "report.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
echo "gpu-check: report in $out/report.md"
exit "$tests_status"
