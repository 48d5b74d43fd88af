#!/usr/bin/env bash
# Install, then run the test suite. The Slurm tests bring up a local Slurm cluster themselves
# (root + apt needed) and skip, saying why, where they cannot.
#
# With no selection of its own (no -m, -k or path), the suite runs in two parts: every lane but
# Slurm on UPCYCLING_TEST_WORKERS processes (pytest-xdist, default 2; --dist loadfile keeps a file's
# tests on one worker, so its module fixtures run once), then the Slurm lane alone, since its tests
# share one local cluster and time real jobs on this machine's CPUs. With a selection, that selection
# runs once: on the workers, or alone where it names the Slurm lane.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
source scripts/env.sh
workers=(-n "${UPCYCLING_TEST_WORKERS:-2}" --dist loadfile)
selected=0
for arg in "$@"; do
  case "$arg" in
    -m | -m* | -k | -k*) selected=1 ;;
    -*) ;; # any other option (its value may hold a path: --basetemp=/tmp/x)
    tests* | */* | *.py) selected=1 ;;
  esac
done
if [ "$selected" = 1 ]; then
  case " $* " in
    *"not slurm"*) ;;
    *slurm*) workers=() ;;
  esac
  exec python -m pytest "${workers[@]}" "$@"
fi
status=0
python -m pytest "${workers[@]}" -m "not slurm" "$@" || status=$?
slurm=0
python -m pytest -m slurm "$@" || slurm=$?
[ "$slurm" = 5 ] && slurm=0 # 5: no test selected
[ "$status" = 0 ] && status=$slurm
exit "$status"
