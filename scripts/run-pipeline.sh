#!/usr/bin/env bash
# Install, then run the whole pipeline on a config (default: config/config.yaml) on this machine.
# Extra arguments go to snakemake, e.g. --configfile config/other.yaml, -n, or a target.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
source scripts/env.sh
snakemake --profile profiles/local "$@"
echo "run-pipeline.sh: results in results/ (report: results/report/summary.md)"
