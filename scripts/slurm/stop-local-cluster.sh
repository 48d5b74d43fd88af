#!/usr/bin/env bash
# Stop the local Slurm cluster that start-local-cluster.sh brought up: slurmd, slurmctld, slurmdbd,
# MariaDB and munged, each by the pid in its pid file (nothing else is touched). Packages, config,
# the accounting database and Slurm's saved state stay, so a later start is quick and keeps job ids
# and `sacct` history. Jobs still running are cancelled first unless --keep-jobs is given.
set -uo pipefail

say() { printf 'stop-local-cluster: %s\n' "$*"; }
[ "$(id -u)" -eq 0 ] || { echo "stop-local-cluster: must run as root" >&2; exit 1; }

keep_jobs=0
[ "${1:-}" = "--keep-jobs" ] && keep_jobs=1

if [ $keep_jobs -eq 0 ] && command -v squeue >/dev/null 2>&1 && squeue -h >/dev/null 2>&1; then
  jobs=$(squeue -h -o %i | tr '\n' ' ')
  if [ -n "${jobs// /}" ]; then
    say "cancelling jobs: $jobs"
    # shellcheck disable=SC2086
    scancel $jobs
    for _ in $(seq 1 60); do [ -z "$(squeue -h -o %i)" ] && break; sleep 0.5; done
  fi
fi

stop() {  # stop NAME PIDFILE
  local name=$1 pidfile=$2 pid
  [ -s "$pidfile" ] || return 0
  pid=$(cat "$pidfile")
  if ! kill -0 "$pid" 2>/dev/null; then rm -f "$pidfile"; return 0; fi
  kill "$pid"
  for _ in $(seq 1 80); do
    kill -0 "$pid" 2>/dev/null || { say "$name stopped"; return 0; }
    sleep 0.25
  done
  say "$name (pid $pid) did not stop in 20 s; killing it"
  kill -9 "$pid" 2>/dev/null || true
}

stop slurmd /run/slurmd.pid
stop slurmctld /run/slurmctld.pid
stop slurmdbd /run/slurmdbd.pid
stop mariadb /run/mysqld/mysqld.pid
stop munged /run/munge/munged.pid
exit 0
