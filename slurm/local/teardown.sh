#!/usr/bin/env bash
# Stop the single-node test cluster started by setup.sh: cancel jobs, then stop slurmd, slurmctld,
# slurmdbd, MariaDB and munged, each by the pid in its pid file (nothing is killed by name).
# Packages, configs and the accounting database stay, so the next setup.sh is fast.
# Usage: sudo slurm/local/teardown.sh [--purge-state]   (--purge-state also wipes the job state dirs)
set -uo pipefail

log() { printf '[slurm-local] %s\n' "$*"; }

stop() {  # stop <name> <pidfile>
  local name=$1 pidfile=$2 pid i
  [ -f "$pidfile" ] || { log "$name: not running"; return 0; }
  pid=$(cat "$pidfile")
  if ! kill -0 "$pid" 2>/dev/null; then log "$name: stale pid file"; rm -f "$pidfile"; return 0; fi
  kill "$pid"
  for ((i = 0; i < 60; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  if kill -0 "$pid" 2>/dev/null; then log "$name: still alive after 30 s, SIGKILL"; kill -9 "$pid"; fi
  rm -f "$pidfile"
  log "$name: stopped"
}

if command -v scancel >/dev/null && [ -f /run/slurm/slurmctld.pid ]; then
  scancel --full --quiet --partition=debug 2>/dev/null || true
fi
stop slurmd /run/slurm/slurmd.pid
stop slurmctld /run/slurm/slurmctld.pid
stop slurmdbd /run/slurm/slurmdbd.pid
stop mariadb /run/mysqld/mysqld.pid
stop munged /run/munge/munged.pid

if [ "${1:-}" = "--purge-state" ]; then
  rm -rf /var/spool/slurmctld/* /var/spool/slurmd/*
  log "job state purged"
fi
