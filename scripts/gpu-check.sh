#!/usr/bin/env bash
# The GPU check: on a machine with a CUDA GPU, install what is missing, run the gpu test tier and
# the training benchmarks, and write a short report (results/gpu-check/report.md, or
# $GPU_CHECK_OUT/report.md). Under 10 minutes on one H100. Without CUDA it says so and exits 0.
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
"$python" -m pytest -m gpu -p no:cacheprovider -q -rA --timeout 900 tests/test_gpu.py 2>&1 | tee "$out/gpu-tests.log"
tests_status=${PIPESTATUS[0]}

# 2. The benchmarks: dense ~125M and ~350M (engine vs plain PyTorch), the E=8 top-2 MoE made of the
#    ~350M's FFN (against the dense model with the same active parameters). seq 1024, bf16.
steps=${GPU_CHECK_STEPS:-10}; rounds=3
[ -n "${GPU_CHECK_QUICK:-}" ] && { steps=4; rounds=2; }
bench() {  # name, then bench_train.py arguments
  local name=$1; shift
  "$python" benchmarks/bench_train.py --seq-len 1024 --vocab 32768 --steps "$steps" --rounds "$rounds" \
    --json "$out/$name.json" "$@" 2>&1 | tee "$out/$name.log" | grep -v "^\[" || true
}
# torch.compile on (training.compile: true in config/paper.yaml); GPU_CHECK_EAGER=1 adds eager runs.
bench dense-125m --preset 125m --batch 16 --only dense --compile
bench dense-350m --preset 350m --batch 16 --only dense --compile
bench moe-350m-e8k2 --preset 350m --batch 8 --only moe --experts 8 --top-k 2 --compile
[ -n "${GPU_CHECK_EAGER:-}" ] && bench dense-350m-eager --preset 350m --batch 16 --only dense

# 3. The report.
"$python" - "$out" "$tests_status" "$started" <<'EOF'
import json, sys, time
from pathlib import Path

out, tests_status, started = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
lines = [f"# GPU check: {(out / 'versions.txt').read_text().strip().removeprefix('gpu-check: ')}", ""]
log = (out / "gpu-tests.log").read_text()
summary = [line for line in log.splitlines() if " passed" in line or " failed" in line or " error" in line]
lines += [f"gpu test tier: {'passed' if tests_status == 0 else 'FAILED'} ({summary[-1].strip('= ') if summary else 'no summary'})", ""]
lines += ["| benchmark | tokens/s | MFU | params (active) | peak GPU memory |", "|---|---|---|---|---|"]
for path in sorted(out.glob("*.json")):
    result = json.loads(path.read_text())
    for key, label in (("dense_engine", "dense, DeepSpeed engine"), ("dense_plain", "dense, plain PyTorch"),
                       ("dense_same_active", "dense with the MoE's active params"), ("moe_engine", "MoE E=8 top-2, engine")):
        if key in result:
            row = result[key]
            mfu = f"{row['mfu']:.1%}" if row.get("mfu") else "n/a"
            lines.append(f"| {path.stem}: {label} | {row['tokens_per_s']:,.0f} | {mfu} | "
                         f"{row['params'] / 1e6:,.0f}M ({row['active_params'] / 1e6:,.0f}M) | "
                         f"{result.get('peak_memory_gib', float('nan')):.1f} GiB |")
    if "engine_overhead" in result:
        lines.append(f"| {path.stem}: engine overhead over plain PyTorch | {result['engine_overhead']:+.1%} | | | |")
    if "moe_cost_per_token_vs_dense" in result:
        lines.append(f"| {path.stem}: MoE cost per token vs dense of equal active params | "
                     f"{result['moe_cost_per_token_vs_dense']:.2f}x | | | |")
lines += ["", f"MFU: training FLOPs per token (6 x active matmul weights + attention) x tokens/s / bf16 peak.",
          f"Wall time of the check: {time.time() - started:.0f} s."]
(out / "report.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
echo "gpu-check: report in $out/report.md"
exit "$tests_status"
