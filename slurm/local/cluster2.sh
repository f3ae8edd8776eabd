#!/usr/bin/env bash
# A two-node cluster on this one machine, for the `cluster` tests: two network namespaces
# ("nodes") joined by a veth pair on a private /24, each with its own address and loopback.
#
#   sudo slurm/local/cluster2.sh up        create dm-node1 (10.77.0.1) and dm-node2 (10.77.0.2)
#   sudo slurm/local/cluster2.sh down      kill every process left in them, delete both (always safe)
#   sudo slurm/local/cluster2.sh status    exit 0 iff both nodes exist and reach each other
#   sudo slurm/local/cluster2.sh exec N CMD...   run CMD on node N (1|2): its network namespace plus a
#                                          UTS namespace named after the node (own hostname), with
#                                          GLOO_SOCKET_IFNAME set to the node's link
#   sudo slurm/local/cluster2.sh pids N    the pids of every process on node N
#
# What it builds: the trainer's two "nodes" are launched with `torchrun --nnodes 2 --node-rank K`
# (static rendezvous on node 1's address), one torchrun per namespace; each node's processes
# (ranks, SGLang-protocol servers, the router) bind that node's address. Slurm is not used here:
# one slurmd per namespace would need slurmctld reachable from inside the namespaces (it listens
# on 127.0.0.1 for the single-node test cluster, which other suites share) and srun's call-back
# addresses resolvable per node; see docs/launch.md.
#
# Traffic stays inside the /24: the namespaces are joined only to each other (no bridge to the
# host, no route out), and nothing is sent anywhere else. Idempotent: `up` on a healthy cluster is
# a no-op, `up` on a half-built one rebuilds it. Env: DM_CLUSTER_SUBNET (default 10.77.0).
set -euo pipefail

SUBNET=${DM_CLUSTER_SUBNET:-10.77.0}
NODES=(dm-node1 dm-node2)
LINKS=(dm-veth1 dm-veth2)

log() { printf '[cluster2] %s\n' "$*"; }
die() { printf '[cluster2] ERROR: %s\n' "$*" >&2; exit 1; }

need_root() { [ "$(id -u)" = 0 ] || die "run as root (creates network namespaces)"; }
exists() { ip netns list 2>/dev/null | awk '{print $1}' | grep -qx "$1"; }
addr() { echo "${SUBNET}.$1"; }

# Node $1 reaches address $2: a TCP connect to the discard port answers "refused" (RST) at once.
reaches() {
  ip netns exec "dm-node$1" python3 -c 'import socket, sys
s = socket.socket(); s.settimeout(2)
sys.exit(0 if s.connect_ex((sys.argv[1], 9)) in (0, 111) else 1)' "$2" 2>/dev/null
}

status() {
  local i
  for i in 1 2; do exists "${NODES[i-1]}" || return 1; done
  reaches 1 "$(addr 2)" && reaches 2 "$(addr 1)"
}

down() {
  local ns pid
  for ns in "${NODES[@]}"; do
    exists "$ns" || continue
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
    ip netns del "$ns" 2>/dev/null || true  # takes its end of the veth pair (and the pair) along
    log "deleted $ns"
  done
  ip link del "${LINKS[0]}" 2>/dev/null || true  # a pair left in the host by an interrupted `up`
}

up() {
  need_root
  command -v ip >/dev/null || die "iproute2 (ip) is missing"
  if status; then log "up: dm-node1 $(addr 1), dm-node2 $(addr 2)"; return 0; fi
  down
  local i ns
  for ns in "${NODES[@]}"; do ip netns add "$ns"; done
  ip link add "${LINKS[0]}" type veth peer name "${LINKS[1]}"
  for i in 1 2; do
    ns=${NODES[i-1]}
    ip link set "${LINKS[i-1]}" netns "$ns"
    ip netns exec "$ns" ip link set lo up
    ip netns exec "$ns" ip addr add "$(addr "$i")/24" dev "${LINKS[i-1]}"
    ip netns exec "$ns" ip link set "${LINKS[i-1]}" up
  done
  for i in $(seq 1 50); do status && break; sleep 0.1; done
  status || { down; die "the nodes do not reach each other"; }
  log "up: dm-node1 $(addr 1), dm-node2 $(addr 2)"
}

run_on() {
  local n=$1; shift
  [ "$n" = 1 ] || [ "$n" = 2 ] || die "node must be 1 or 2, got '$n'"
  exists "dm-node$n" || die "dm-node$n does not exist: run '$0 up' first"
  # gloo picks its interface from the hostname, which resolves to nothing routable here: name it
  GLOO_SOCKET_IFNAME="dm-veth$n" exec ip netns exec "dm-node$n" unshare --uts -- \
    sh -c 'hostname "$0" && exec "$@"' "dm-node$n" "$@"
}

case "${1:-}" in
  up) up ;;
  down) need_root; down ;;
  status) status ;;
  exec) shift; [ $# -ge 2 ] || die "usage: $0 exec NODE CMD..."; need_root; run_on "$@" ;;
  pids) [ -n "${2:-}" ] || die "usage: $0 pids NODE"; ip netns pids "dm-node$2" ;;
  *) die "usage: $0 up|down|status|exec NODE CMD...|pids NODE" ;;
esac
