#!/usr/bin/env bash
# Install the pipeline and its test tools into .venv. Idempotent: a second run only checks.
# torch comes first: 2.13.0's CPU wheel lies on this kind of machine's disk, and installing it
# before anything that depends on torch keeps pip from pulling a several-GB CUDA build. On a GPU
# cluster, install your CUDA torch into the environment first (or use environment.yml).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}" 2>&1 | grep -v "is ignored" || true
fi
.venv/bin/python -m pip install -q -e ".[test]" 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import torch, deepspeed, snakemake, upcycling" 2>/dev/null \
  || { echo "install.sh: the environment in .venv is incomplete (see pip's output above)" >&2; exit 1; }
echo "install.sh: .venv ready (torch $(.venv/bin/python -c 'import torch; print(torch.__version__)'))"
