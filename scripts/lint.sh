#!/usr/bin/env bash
# The checks every change passes before the tests (.ci/run runs them; so does pre-commit):
# lint and format (ruff; snakefmt for the rules), the stages' import contracts (import-linter,
# contracts in pyproject.toml) and types (mypy, settings in pyproject.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/ruff ] || bash scripts/install.sh
export PATH="$PWD/.venv/bin:$PATH"
failed=0
check() {
  echo "lint.sh: $*"
  "$@" || { echo "lint.sh: FAILED: $*" >&2; failed=1; }
}
check ruff check src tests benchmarks
check ruff format --check src tests benchmarks
check snakefmt --check Snakefile workflow/rules
check lint-imports
check mypy
exit "$failed"
