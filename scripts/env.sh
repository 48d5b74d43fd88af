# Sourced by the run and test scripts: the environment every stage runs in on this kind of machine.
export PATH="$PWD/.venv/bin:$PATH"
# No GPU: DeepSpeed's CPU accelerator. Its first distributed init JIT-builds a comm op (~30 s);
# the cache below keeps that to once per checkout.
if ! .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  export DS_ACCELERATOR=cpu
fi
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.torch_extensions}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
