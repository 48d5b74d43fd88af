# Sourced by the run and test scripts: the environment every stage runs in on this kind of machine.
# scripts/slurm/bin first: its sbatch waits out an unreachable Slurm controller (see the script).
export PATH="$PWD/scripts/slurm/bin:$PWD/.venv/bin:$PATH"
# No GPU: DeepSpeed's CPU accelerator (the trainer keeps it from JIT-building its shared-memory op;
# train/distributed.py says why). The cache below is for any op DeepSpeed does build.
if ! .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  export DS_ACCELERATOR=cpu
fi
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.torch_extensions}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
