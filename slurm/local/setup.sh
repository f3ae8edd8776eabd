#!/usr/bin/env bash
# Install, configure and start a single-node Slurm cluster on this machine, for the launcher tests.
#
# Why: NeMo-Run submits with sbatch and polls job state with sacct, so the tests need a real
# slurmctld + slurmd *and* real accounting (slurmdbd + MariaDB). No systemd is assumed (CI
# containers have none): every daemon is started directly, traffic stays on 127.0.0.1.
# Idempotent: packages already installed are skipped, running daemons are left alone unless their
# config changed, and the script returns only once `sinfo` shows the node idle and `sacct` works.
#
# Usage: sudo slurm/local/setup.sh        (env: SLURM_LOCAL_CPUS, SLURM_LOCAL_MEMORY_MB to override)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PACKAGES=(slurm-wlm slurmdbd munge mariadb-server)
SLURM_USER=slurm
DB_PASS=slurm-local-test  # loopback-only throwaway cluster
WAIT_S=${SLURM_LOCAL_WAIT_S:-90}

log() { printf '[slurm-local] %s\n' "$*"; }
die() { printf '[slurm-local] ERROR: %s\n' "$*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root (installs packages and starts daemons)"

# Wait until "$@" succeeds, at most WAIT_S seconds; $1 is a description for the error message.
wait_for() {
  local what=$1; shift
  local i
  for ((i = 0; i < WAIT_S * 2; i++)); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.5
  done
  die "timed out after ${WAIT_S}s waiting for: $what"
}

# A daemon is running when its pid file names a live process.
running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# ---------------------------------------------------------------- packages
install_packages() {
  local missing=()
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -eq 0 ]; then log "packages present: ${PACKAGES[*]}"; return; fi
  log "installing: ${missing[*]}"
  # keep package scripts from starting daemons behind our back (no init system here)
  local made_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d
    made_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
  [ $made_policy = 1 ] && rm -f /usr/sbin/policy-rc.d
  return 0
}

# ---------------------------------------------------------------- munge
start_munge() {
  id munge >/dev/null 2>&1 || die "user munge missing after installing munge"
  mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
  [ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
  chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
  chmod 0700 /etc/munge; chmod 0400 /etc/munge/munge.key; chmod 0755 /run/munge
  if ! running /run/munge/munged.pid; then
    log "starting munged"
    runuser -u munge -- /usr/sbin/munged
  fi
  wait_for "munge round trip" bash -c 'munge -n | unmunge'
}

# ---------------------------------------------------------------- mariadb
start_mariadb() {
  mkdir -p /run/mysqld /var/log/mysql
  chown mysql:mysql /run/mysqld /var/log/mysql
  if [ ! -d /var/lib/mysql/mysql ]; then
    log "initialising MariaDB data dir"
    mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
  fi
  if ! running /run/mysqld/mysqld.pid; then
    log "starting MariaDB (127.0.0.1 only)"
    setsid /usr/sbin/mariadbd --user=mysql --bind-address=127.0.0.1 \
      --pid-file=/run/mysqld/mysqld.pid --socket=/run/mysqld/mysqld.sock \
      --log-error=/var/log/mysql/error.log </dev/null >/dev/null 2>&1 &
  fi
  wait_for "MariaDB to answer" mariadb-admin --socket=/run/mysqld/mysqld.sock ping
  mariadb --socket=/run/mysqld/mysqld.sock <<SQL
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '${DB_PASS}';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
SQL
}

# ---------------------------------------------------------------- slurm config
# Render a template to a path; print "changed" when the content differs from what is there.
render() {
  local src=$1 dst=$2 mode=$3 owner=$4 tmp
  tmp=$(mktemp)
  sed -e "s/@SLURM_USER@/${SLURM_USER}/g" -e "s/@CPUS@/${CPUS}/g" \
      -e "s/@MEMORY_MB@/${MEMORY_MB}/g" -e "s/@DB_PASS@/${DB_PASS}/g" "$src" > "$tmp"
  if [ -f "$dst" ] && cmp -s "$tmp" "$dst"; then rm -f "$tmp"; return 0; fi
  install -m "$mode" -o "$owner" -g "$owner" "$tmp" "$dst"; rm -f "$tmp"
  echo changed
}

configure_slurm() {
  id "$SLURM_USER" >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin "$SLURM_USER"
  # at least 2 CPUs (the 2-rank test jobs ask for them); config_overrides lets us declare them
  CPUS=${SLURM_LOCAL_CPUS:-$(( $(nproc) < 2 ? 2 : $(nproc) ))}
  local mem_total_mb
  mem_total_mb=$(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo)
  MEMORY_MB=${SLURM_LOCAL_MEMORY_MB:-$((mem_total_mb * 8 / 10))}
  mkdir -p /etc/slurm /var/log/slurm /var/spool/slurmctld /var/spool/slurmd /run/slurm
  chown "$SLURM_USER:$SLURM_USER" /var/log/slurm /var/spool/slurmctld /run/slurm
  chmod 0755 /run/slurm /var/log/slurm
  CONF_CHANGED=$(render "$HERE/slurm.conf.in" /etc/slurm/slurm.conf 0644 root)
  DBD_CHANGED=$(render "$HERE/slurmdbd.conf.in" /etc/slurm/slurmdbd.conf 0600 "$SLURM_USER")
}

stop_pidfile() {  # stop the daemon named by a pid file (config changed), wait for it to go
  local pidfile=$1 pid
  running "$pidfile" || return 0
  pid=$(cat "$pidfile"); log "restarting $(basename "$pidfile" .pid) (config changed)"
  kill "$pid"
  wait_for "pid $pid to exit" bash -c "! kill -0 $pid"
}

start_slurmdbd() {
  [ -n "$DBD_CHANGED" ] && stop_pidfile /run/slurm/slurmdbd.pid
  if ! running /run/slurm/slurmdbd.pid; then log "starting slurmdbd"; slurmdbd; fi
  wait_for "slurmdbd to answer sacctmgr" sacctmgr -n -P list cluster
  if ! sacctmgr -n -P list cluster format=cluster | grep -qx local; then
    sacctmgr -i add cluster local >/dev/null
  fi
}

start_slurm_daemons() {
  if [ -n "$CONF_CHANGED" ]; then
    stop_pidfile /run/slurm/slurmd.pid
    stop_pidfile /run/slurm/slurmctld.pid
  fi
  if ! running /run/slurm/slurmctld.pid; then log "starting slurmctld"; slurmctld; fi
  wait_for "slurmctld to answer" scontrol ping
  if ! running /run/slurm/slurmd.pid; then log "starting slurmd (node localhost)"; slurmd -N localhost; fi
}

node_state() { sinfo -h -N -n localhost -o %T 2>/dev/null | head -n1; }

wait_idle() {
  local i state
  for ((i = 0; i < WAIT_S * 2; i++)); do
    state=$(node_state)
    case "$state" in
      idle|mixed|allocated) log "node localhost: $state"; return 0 ;;
      down*|drain*|drained*) scontrol update nodename=localhost state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 0.5
  done
  die "node localhost not idle after ${WAIT_S}s (state: '${state:-?}'); see /var/log/slurm/slurmd.log"
}

main() {
  local t0=$SECONDS
  install_packages
  start_munge
  start_mariadb
  configure_slurm
  start_slurmdbd
  start_slurm_daemons
  wait_idle
  wait_for "sacct to query accounting" sacct -n -X -S now-1hours
  log "ready in $((SECONDS - t0)) s: $(sinfo -h -o '%P %a %D %T' | head -n1)"
}

main "$@"
