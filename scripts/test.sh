#!/usr/bin/env bash
# Install, then run the test suite. The Slurm tests bring up a local Slurm cluster themselves
# (root + apt needed) and skip, saying why, where they cannot.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
source scripts/env.sh
python -m pytest "$@"
