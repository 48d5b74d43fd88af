#!/usr/bin/env bash
# Install, then run the test suite. The Slurm tests bring up a local Slurm cluster themselves
# (root + apt needed) and skip, saying why, where they cannot.
#
# With no selection of its own (no -m, -k or path), the suite runs in two parts:
#   1. every lane but Slurm on UPCYCLING_TEST_WORKERS processes (pytest-xdist, default 2; --dist
#      loadfile keeps a file's tests on one worker, so its module fixtures run once), and beside
#      them, in one process of its own, the Slurm lane: its tests share one local cluster and mostly
#      wait on it (half a core on average, measured); its report follows the workers';
#   2. alone, the tests marked `alone`, which measure a job's use of the machine's CPUs.
# With --basetemp, the Slurm lane runs after the workers instead (two sessions would share, and wipe,
# that directory). With a selection, that selection runs once: on the workers, or in one process
# where it names the Slurm lane.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
source scripts/env.sh
workers=(-n "${UPCYCLING_TEST_WORKERS:-2}" --dist loadfile)
selected=0
beside=1
for arg in "$@"; do
  case "$arg" in
    --basetemp*) beside=0 ;;
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
passed() { [ "$1" = 0 ] || [ "$1" = 5 ]; } # 5: no test selected
slurm_report=$(mktemp -t slurm-lane.XXXXXX)
trap 'rm -f "$slurm_report"' EXIT
# The Slurm lane's two runs collect tests/slurm/ only (tests/conftest.py keeps `alone` tests there):
# collecting the whole suite costs 15 s of CPU.
slurm_lane=(python -m pytest -m "slurm and not alone" "$@" tests/slurm)
if [ "$beside" = 1 ]; then
  "${slurm_lane[@]}" >"$slurm_report" 2>&1 &
  slurm_pid=$!
  trap 'kill "$slurm_pid" 2>/dev/null || true; rm -f "$slurm_report"' EXIT
  echo "test.sh: the Slurm lane runs beside the workers; its report follows theirs"
fi
lanes=0
python -m pytest "${workers[@]}" -m "not slurm and not alone" "$@" || lanes=$?
slurm=0
if [ "$beside" = 1 ]; then
  wait "$slurm_pid" || slurm=$?
else
  "${slurm_lane[@]}" >"$slurm_report" 2>&1 || slurm=$?
fi
echo "test.sh: the Slurm lane:"
cat "$slurm_report"
alone=0
python -m pytest -m alone "$@" tests/slurm || alone=$?
for status in "$lanes" "$slurm" "$alone"; do
  passed "$status" || exit "$status"
done
