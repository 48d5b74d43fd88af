# Sourced by scripts/gpu-check.sh: an environment with the package on a GPU machine; sets $python.
# With `upcycling`, DeepSpeed and Snakemake importable in $python nothing is installed. Otherwise a
# virtual environment layered on $python's own (it sees $python's packages, the machine's CUDA
# torch among them, through a .pth file) is made in $GPU_CHECK_VENV and the package installed into
# it: from the wheels in ./.whl when there are some (a machine without internet), else the index.
python=${python:-${PYTHON:-python3}}
if ! "$python" -c "import upcycling, deepspeed, snakemake" 2>/dev/null; then
  venv=${GPU_CHECK_VENV:-/tmp/upcycling-gpu-venv}
  "$python" -m venv "$venv"
  # A venv made from a venv sees the base interpreter's packages, not its parent's: add the parent's.
  parent=$("$python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  child=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  echo "$parent" > "$child/_upcycling_parent_env.pth"
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$venv/bin/pip" install -q --no-index --no-deps .whl/*.whl
    "$venv/bin/pip" install -q --no-index --no-deps --no-build-isolation -e .
  else
    "$venv/bin/pip" install -q -e ".[test]"
  fi
  python="$venv/bin/python"
  export PATH="$venv/bin:$PATH"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.torch_extensions}"
