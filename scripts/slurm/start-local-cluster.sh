#!/usr/bin/env bash
# Bring up a real single-node Slurm cluster on this machine (localhost), for the Slurm tests and for
# trying the pipeline's Slurm profile without a cluster. Idempotent: a second run only checks that
# everything answers (and restarts the Slurm daemons when the generated config changed).
#
#   sudo bash scripts/slurm/start-local-cluster.sh      # exit 0: `sinfo` and `sacct` answer
#   sudo bash scripts/slurm/stop-local-cluster.sh
#
# What it does, as root and without systemd (each daemon forks and writes a pid file under /run):
#   1. apt-get install Debian's slurm-wlm, munge, slurmdbd and mariadb-server if they are missing;
#   2. munged (as the munge user), with a key made here if the package did not make one;
#   3. MariaDB on 127.0.0.1 only, a `slurm` database user, and slurmdbd: accounting, so `sacct`
#      works. Without it the Snakemake Slurm plugin polls a failing `sacct` and hangs silently,
#      and submitit cannot see jobs that Slurm killed (see docs/slurm.md);
#   4. slurmctld and slurmd with one node (NodeName = `hostname -s`, NodeAddr 127.0.0.1) in one
#      partition `cpu` (the default).
#
# Environment: SLURM_LOCAL_APT_OPTIONS extra apt-get options (e.g. "-o Dir::Cache::Archives=/tmp/x/"
# to time an install from an empty package cache); SLURM_LOCAL_FORCE=1 overwrites an
# /etc/slurm/slurm.conf that this script did not write (it is kept as slurm.conf.orig).
# Logs: /var/log/slurm/*.log, /var/log/mysql/error.log. Exit codes: 0 up; 1 cannot (says why).
set -uo pipefail

MARK="# written by upcycling scripts/slurm/start-local-cluster.sh"
CLUSTER=local
PARTITION=cpu
CONF_DIR=/etc/slurm
LOG_DIR=/var/log/slurm
DB_SOCKET=/run/mysqld/mysqld.sock
DB_PID=/run/mysqld/mysqld.pid

say() { printf 'start-local-cluster: %s\n' "$*"; }
die() { printf 'start-local-cluster: cannot start the local Slurm cluster: %s\n' "$*" >&2; exit 1; }
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...: poll until COMMAND succeeds
  local limit=$1 what=$2; shift 2
  local deadline=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -ge $deadline ] && return 1
    sleep 0.5
  done
}
started_at=$SECONDS

[ "$(id -u)" -eq 0 ] || die "it must run as root (it installs packages and starts system daemons); rerun with sudo"

# ---------------------------------------------------------------------------------------- packages
need_install=0
for binary in slurmctld slurmd slurmdbd sinfo sacct sacctmgr munged mariadbd mariadb; do
  command -v "$binary" >/dev/null 2>&1 || { need_install=1; break; }
done
if [ $need_install -eq 1 ]; then
  command -v apt-get >/dev/null 2>&1 || die "Slurm is not installed and there is no apt-get to install it (a Debian/Ubuntu machine is needed)"
  say "installing slurm-wlm munge slurmdbd mariadb-server with apt-get (\"policy-rc.d denied execution\" is expected)"
  packages=(slurm-wlm munge slurmdbd mariadb-server)
  # shellcheck disable=SC2086
  apt_install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
                  ${SLURM_LOCAL_APT_OPTIONS:-} "${packages[@]}"; }
  if ! apt_install >/tmp/start-local-cluster.apt.log 2>&1; then
    say "apt-get install failed; running apt-get update and trying once more"
    apt-get update -q >>/tmp/start-local-cluster.apt.log 2>&1
    apt_install >>/tmp/start-local-cluster.apt.log 2>&1 \
      || { tail -20 /tmp/start-local-cluster.apt.log >&2; die "apt-get install failed (log: /tmp/start-local-cluster.apt.log)"; }
  fi
  say "packages installed in $((SECONDS - started_at)) s"
fi

# ---------------------------------------------------------------------------------------- munge
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
chmod 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
  say "creating /etc/munge/munge.key"
  if command -v mungekey >/dev/null 2>&1; then mungekey --create --keyfile=/etc/munge/munge.key --force
  else dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; fi
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  runuser -u munge -- /usr/sbin/munged || die "munged did not start (see /var/log/munge/munged.log)"
  wait_for 10 munge sh -c 'munge -n | unmunge' || die "munged started but does not answer (see /var/log/munge/munged.log)"
  say "munged started"
fi

# ---------------------------------------------------------------------------------------- MariaDB
mkdir -p /run/mysqld /var/log/mysql
chown mysql:mysql /run/mysqld /var/log/mysql
if [ ! -d /var/lib/mysql/mysql ]; then
  say "initialising the MariaDB data directory"
  mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/var/log/mysql/install-db.log 2>&1 \
    || die "mariadb-install-db failed (see /var/log/mysql/install-db.log)"
fi
if ! mariadb-admin --socket="$DB_SOCKET" ping >/dev/null 2>&1; then
  # Bound to 127.0.0.1 only; slurmdbd connects through the socket.
  setsid /usr/sbin/mariadbd --user=mysql --datadir=/var/lib/mysql --bind-address=127.0.0.1 --port=3306 \
    --socket="$DB_SOCKET" --pid-file="$DB_PID" --log-error=/var/log/mysql/error.log \
    </dev/null >/dev/null 2>&1 &
  wait_for 60 mariadb mariadb-admin --socket="$DB_SOCKET" ping \
    || die "MariaDB did not start (see /var/log/mysql/error.log)"
  say "MariaDB started on 127.0.0.1"
fi

# ---------------------------------------------------------------------------------------- config
mkdir -p "$CONF_DIR" "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd
if [ -f "$CONF_DIR/slurm.conf" ] && ! grep -qF "$MARK" "$CONF_DIR/slurm.conf"; then
  [ "${SLURM_LOCAL_FORCE:-0}" = 1 ] \
    || die "$CONF_DIR/slurm.conf exists and was not written by this script (a real cluster's config?); set SLURM_LOCAL_FORCE=1 to replace it (it is kept as slurm.conf.orig)"
  cp -p "$CONF_DIR/slurm.conf" "$CONF_DIR/slurm.conf.orig"
fi

host=$(hostname -s)
# The node as slurmd sees it (CPUs, sockets, cores, threads, memory); keep 5% of memory back.
hardware=$(slurmd -C 2>/dev/null | head -1) || true
cpus=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$hardware"); cpus=${cpus:-$(nproc)}
memory=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hardware")
memory=${memory:-$(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo)}
memory=$((memory * 95 / 100))
topology=$(grep -o 'Boards=[0-9]* SocketsPerBoard=[0-9]* CoresPerSocket=[0-9]* ThreadsPerCore=[0-9]*' <<<"$hardware" || true)
# Jobs that ask for no memory get this much per CPU (without it they get the whole node).
def_mem=$((memory / cpus / 2))

db_pass=""
[ -f "$CONF_DIR/slurmdbd.conf" ] && db_pass=$(sed -n 's/^StoragePass=//p' "$CONF_DIR/slurmdbd.conf")
[ -n "$db_pass" ] || db_pass=$(head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')

new_conf=$(cat <<EOF
$MARK
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job may start again after cred_expire seconds (default 120).
AuthInfo=cred_expire=10
MpiDefault=none
# No cgroups and no systemd here: track processes by parent pid, bind no tasks.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$def_mem
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=5
# Finished jobs stay visible to squeue/scontrol this long (sacct keeps them for good).
MinJobAge=300
KillWait=30
ReturnToService=2
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
# Keep each job's --comment (the Snakemake plugin puts the rule and wildcards there): sacct -o jobid,comment%80
AccountingStoreFlags=job_comment
JobCompType=jobcomp/none
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus $topology RealMemory=$memory State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
)
new_dbd=$(cat <<EOF
$MARK
AuthType=auth/munge
DbdAddr=127.0.0.1
DbdHost=localhost
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$db_pass
StorageLoc=slurm_acct_db
LogFile=$LOG_DIR/slurmdbd.log
PidFile=/run/slurmdbd.pid
EOF
)
changed=0
if [ "$(cat "$CONF_DIR/slurm.conf" 2>/dev/null)" != "$new_conf" ]; then
  printf '%s\n' "$new_conf" >"$CONF_DIR/slurm.conf"; chmod 0644 "$CONF_DIR/slurm.conf"; changed=1
fi
if [ "$(cat "$CONF_DIR/slurmdbd.conf" 2>/dev/null)" != "$new_dbd" ]; then
  printf '%s\n' "$new_dbd" >"$CONF_DIR/slurmdbd.conf"; changed=1
fi
chmod 0600 "$CONF_DIR/slurmdbd.conf"

mariadb --socket="$DB_SOCKET" -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
  CREATE USER IF NOT EXISTS 'slurm'@'localhost';
  ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$db_pass';
  GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;" \
  || die "could not create the accounting database user in MariaDB"

stop_daemon() {  # stop_daemon PIDFILE NAME: TERM the pid in PIDFILE and wait for it to exit
  local pidfile=$1 pid
  alive "$pidfile" || return 0
  pid=$(cat "$pidfile")
  kill "$pid" 2>/dev/null
  for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.25; done
  kill -9 "$pid" 2>/dev/null || true
}
if [ $changed -eq 1 ]; then
  # Running jobs survive a restart of the daemons; accounting keeps its history.
  for daemon in slurmd slurmctld slurmdbd; do
    alive /run/$daemon.pid && say "config changed: restarting $daemon"
    stop_daemon /run/$daemon.pid
  done
fi

# ---------------------------------------------------------------------------------------- daemons
if ! alive /run/slurmdbd.pid; then
  /usr/sbin/slurmdbd || die "slurmdbd did not start (see $LOG_DIR/slurmdbd.log)"
  wait_for 30 slurmdbd sacctmgr -n list cluster \
    || die "slurmdbd started but sacctmgr cannot reach it (see $LOG_DIR/slurmdbd.log)"
  say "slurmdbd started"
fi
if ! sacctmgr -n -P list cluster format=cluster 2>/dev/null | grep -qx "$CLUSTER"; then
  sacctmgr -i add cluster "$CLUSTER" >/dev/null || die "could not register cluster $CLUSTER with slurmdbd"
fi
if ! alive /run/slurmctld.pid; then
  /usr/sbin/slurmctld || die "slurmctld did not start (see $LOG_DIR/slurmctld.log)"
  say "slurmctld started"
fi
if ! alive /run/slurmd.pid; then
  /usr/sbin/slurmd || die "slurmd did not start (see $LOG_DIR/slurmd.log)"
  say "slurmd started"
fi

node_ready() { sinfo -h -n "$host" -o %T 2>/dev/null | grep -Eq '^(idle|mixed|allocated|completing)'; }
if ! wait_for 30 node node_ready; then
  state=$(sinfo -h -n "$host" -o %T 2>/dev/null)
  if [ -n "$state" ]; then  # down/drained from an earlier run or an unexpected reboot
    scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true
  fi
  wait_for 30 node node_ready \
    || die "node $host is not usable (state: ${state:-none}; sinfo -R: $(sinfo -h -R 2>/dev/null); see $LOG_DIR/slurmd.log and slurmctld.log)"
fi
sacct -n -X -S now-1minute >/dev/null 2>&1 || die "sacct does not answer: accounting is not working (see $LOG_DIR/slurmdbd.log)"
say "up in $((SECONDS - started_at)) s: cluster $CLUSTER, partition $PARTITION (default), node $host with $cpus CPUs and $memory MB"
sinfo
