"""Where each process of a run lives: actor ranks, SGLang servers, the router, the weight-sync route.

One pure function, :func:`place`: (nodes, GPUs per node, actor TP/PP/CP, rollout placement, rollout
nodes, SGLang TP / DP-attention, ports, node addresses) → :class:`Placement`. No I/O and no
``torch.distributed``: the runtime (``rollout/placement.py``) resolves each node's routable address,
calls this, and acts on the answer, so a layout can be checked (and printed) before any job starts.

Conventions the answer follows:

* torchrun numbers ranks node by node, so the trainer's node ``n`` holds global ranks
  ``n·g .. n·g+g−1`` (``g`` = GPUs, or CPU ranks, per node); megatron orders a node's ranks
  ``tp-cp-dp-pp`` (TP fastest), so the sender of pipeline stage ``s`` (TP 0, CP 0, DP 0) is global
  rank ``s·tp·cp·dp``.
* ``colocated``: every actor node runs ``servers_per_node`` servers on its own GPUs
  (``i·tp .. i·tp+tp−1``), started by the node's local rank 0; the router runs on node 0 (global
  rank 0). Weights reach a node's servers by CUDA IPC from that node's local rank 0, which receives
  each PP stage's buckets from the stage's sender (route ``ipc``).
* ``disaggregated``: the last ``rollout_nodes`` nodes only serve, started by a serving process of
  their own (``python -m delta_megatron.rollout.serve``); the router runs on the first of them.
  Each PP stage's sender joins one process group with every server TP rank
  (``/init_weights_update_group``, port ``sync_port_base + stage``) and broadcasts its own layers
  (route ``distributed``: NCCL on GPU, gloo on CPU).
* ``disk``: every stage sender writes its layers as safetensors into a shared directory, then the
  servers load it (either placement).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from delta_megatron.utils.configs import ConfigError

__all__ = ["ServerSlot", "StageRoute", "Placement", "place", "stage_sender_rank", "node_of_rank"]

PlacementMode = Literal["colocated", "disaggregated"]
SyncKind = Literal["ipc", "distributed", "disk"]


@dataclass(frozen=True)
class ServerSlot:
    """One SGLang server: its node, GPUs on that node, address and who starts it."""

    node: int
    index: int  # server index on its node
    gpu_ids: tuple[int, ...]
    host: str
    port: int
    dp_attention: int
    launcher_rank: int | None  # trainer global rank that starts it; None: the node's serving process

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def tp(self) -> int:
        return len(self.gpu_ids)

    @property
    def base_gpu_id(self) -> int:
        return self.gpu_ids[0]


@dataclass(frozen=True)
class StageRoute:
    """How one pipeline stage's weights reach the servers.

    ``ipc``: the sender broadcasts each bucket to ``receivers`` (the local rank 0 of every node that
    hosts servers; the sender is first), each of which pushes it to its own node's servers.
    ``distributed``: the sender is rank 0 of a group with every server TP rank; ``rank_offsets``
    gives each server URL its first rank. ``disk``: the sender writes its layers into the shared
    directory; rank 0 asks the servers to load it after every stage wrote.
    """

    stage: int
    sender_rank: int
    sender_node: int
    receivers: tuple[int, ...] = ()
    master_address: str | None = None
    master_port: int | None = None
    group_name: str | None = None
    world_size: int = 0
    rank_offsets: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class Placement:
    mode: PlacementMode
    nodes: int
    gpus_per_node: int
    actor_nodes: tuple[int, ...]
    rollout_nodes: tuple[int, ...]  # nodes that host servers
    addresses: tuple[str, ...]
    servers: tuple[ServerSlot, ...]
    router_node: int
    router_host: str
    router_port: int
    router_launcher_rank: int | None
    sync: SyncKind
    stages: tuple[StageRoute, ...] = field(default=())

    @property
    def router_url(self) -> str:
        return f"http://{self.router_host}:{self.router_port}"

    @property
    def worker_urls(self) -> list[str]:
        return [s.url for s in self.servers]

    def servers_on(self, node: int) -> list[ServerSlot]:
        return [s for s in self.servers if s.node == node]

    def launched_by(self, rank: int) -> list[ServerSlot]:
        """The servers trainer rank ``rank`` starts (empty for every rank but node leaders)."""
        return [s for s in self.servers if s.launcher_rank == rank]

    def node_leader(self, node: int) -> int:
        return node * self.gpus_per_node

    def describe(self) -> str:
        """A table for logs and ``plan``: node, role, servers (GPUs, URL), route."""
        lines = [f"placement {self.mode}: {self.nodes} node(s) x {self.gpus_per_node} GPU(s), "
                 f"weight sync {self.sync}, router {self.router_url} (node {self.router_node})"]
        for n in range(self.nodes):
            role = ("actor+rollout" if n in self.actor_nodes and n in self.rollout_nodes
                    else "actor" if n in self.actor_nodes else "rollout")
            servers = ", ".join(f"{s.url} gpus {','.join(map(str, s.gpu_ids))}" for s in self.servers_on(n))
            lines.append(f"  node {n} ({self.addresses[n]}): {role}" + (f"; servers {servers}" if servers else ""))
        for st in self.stages:
            extra = (f" -> ranks {list(st.receivers)}" if st.receivers else
                     f" -> group {st.group_name} at {st.master_address}:{st.master_port} "
                     f"(world {st.world_size})" if st.master_address else "")
            lines.append(f"  pp stage {st.stage}: sender rank {st.sender_rank} (node {st.sender_node}){extra}")
        return "\n".join(lines)


def node_of_rank(rank: int, gpus_per_node: int) -> int:
    return rank // gpus_per_node


def stage_sender_rank(stage: int, tp: int, cp: int, dp: int) -> int:
    """Global rank of (TP 0, CP 0, DP 0) of pipeline stage ``stage`` in megatron's tp-cp-dp-pp order."""
    return stage * tp * cp * dp


def _fail(path: str, value, allowed: str):
    raise ConfigError(path, value, allowed)


def place(*, nodes: int, gpus_per_node: int, tp: int = 1, pp: int = 1, cp: int = 1,
          mode: PlacementMode = "colocated", rollout_nodes: int = 0, sglang_tp: int = 1,
          dp_attention: int = 1, servers_per_node: int = 0, port_base: int = 30000, port_stride: int = 1,
          router_port: int = 29000, sync_port_base: int = 29100, weight_sync: str = "auto",
          addresses: tuple[str, ...] | list[str] | None = None) -> Placement:
    """The placement of a run; raises :class:`ConfigError` naming the field of an invalid layout.

    ``nodes`` counts every node of the job (actor and rollout); ``rollout_nodes`` of them serve only
    (``disaggregated``). ``servers_per_node`` = 0 fills each serving node (``gpus_per_node // sglang_tp``).
    ``weight_sync``: ``auto`` (ipc when colocated, distributed when disaggregated), ``ipc``,
    ``distributed`` or ``disk``. ``addresses``: each node's routable address (default ``node{i}``).
    """
    if nodes < 1:
        _fail("nodes", nodes, "must be >= 1")
    if gpus_per_node < 1:
        _fail("gpus_per_node", gpus_per_node, "must be >= 1 (GPUs, or CPU ranks, per node)")
    for name, value in (("parallel.tp", tp), ("parallel.pp", pp), ("parallel.cp", cp),
                        ("rollout.sglang.tp", sglang_tp), ("rollout.sglang.dp_attention", dp_attention)):
        if value < 1:
            _fail(name, value, "must be >= 1")
    if mode == "colocated":
        if rollout_nodes:
            _fail("rollout.nodes", rollout_nodes, "must be 0 with rollout.placement: colocated "
                                                  "(servers share the actor's nodes)")
        actor_nodes, serving = tuple(range(nodes)), tuple(range(nodes))
    elif mode == "disaggregated":
        if not 1 <= rollout_nodes < nodes:
            _fail("rollout.nodes", rollout_nodes, f"disaggregated needs 1 <= rollout.nodes < nodes={nodes} "
                                                  "(at least one node trains, at least one serves)")
        actor_nodes = tuple(range(nodes - rollout_nodes))
        serving = tuple(range(nodes - rollout_nodes, nodes))
    else:
        _fail("rollout.placement", mode, "allowed: 'colocated', 'disaggregated'")
    actor_ranks = len(actor_nodes) * gpus_per_node
    if actor_ranks % (tp * pp * cp):
        _fail("parallel.tp", tp, f"tp*pp*cp = {tp}*{pp}*{cp} must divide the actor's {actor_ranks} ranks "
                                 f"({len(actor_nodes)} node(s) x {gpus_per_node})")
    dp = actor_ranks // (tp * pp * cp)
    if sglang_tp > gpus_per_node or gpus_per_node % sglang_tp:
        _fail("rollout.sglang.tp", sglang_tp, f"must divide gpus_per_node={gpus_per_node} "
                                              "(a server's GPUs are on one node)")
    if sglang_tp % dp_attention:
        _fail("rollout.sglang.dp_attention", dp_attention, f"must divide rollout.sglang.tp={sglang_tp}")
    per_node = servers_per_node or gpus_per_node // sglang_tp
    if servers_per_node < 0 or per_node * sglang_tp > gpus_per_node:
        _fail("rollout.sglang.servers_per_node", servers_per_node,
              f"servers_per_node * tp must be <= gpus_per_node={gpus_per_node} (0: fill the node)")
    sync = weight_sync if weight_sync != "auto" else ("ipc" if mode == "colocated" else "distributed")
    if sync not in ("ipc", "distributed", "disk"):
        _fail("rollout.sglang.weight_sync", weight_sync, "allowed: 'auto', 'ipc', 'distributed', 'disk'")
    if sync == "ipc" and mode != "colocated":
        _fail("rollout.sglang.weight_sync", weight_sync, "ipc needs rollout.placement: colocated "
                                                         "(CUDA IPC reaches only GPUs of the same node)")
    addresses = tuple(addresses) if addresses is not None else tuple(f"node{i}" for i in range(nodes))
    if len(addresses) != nodes:
        _fail("addresses", list(addresses), f"need one address per node ({nodes})")
    server_ports = {port_base + i * port_stride for i in range(per_node)}
    sync_ports = {sync_port_base + s for s in range(pp)} if sync == "distributed" else set()
    if len(server_ports) != per_node or port_stride < 1:
        _fail("rollout.sglang.port_stride", port_stride, "must be >= 1")
    router_ports = {router_port, router_port + 1}  # the router and its Prometheus exporter
    if router_ports & server_ports:
        _fail("rollout.sglang.router_port", router_port,
              f"router_port or router_port + 1 (metrics) collides with a server port ({port_base} + i*{port_stride}, "
              f"i < {per_node})")
    if sync_ports & (server_ports | router_ports):
        _fail("rollout.sglang.sync_port_base", sync_port_base,
              "sync_port_base + stage collides with a server or router port")

    servers = tuple(
        ServerSlot(node=n, index=i, gpu_ids=tuple(range(i * sglang_tp, (i + 1) * sglang_tp)),
                   host=addresses[n], port=port_base + i * port_stride, dp_attention=dp_attention,
                   launcher_rank=n * gpus_per_node if mode == "colocated" else None)
        for n in serving for i in range(per_node))
    router_node = serving[0]
    stages = []
    for s in range(pp):
        sender = stage_sender_rank(s, tp, cp, dp)
        sender_node = node_of_rank(sender, gpus_per_node)
        if sync == "ipc":
            leaders = [n * gpus_per_node for n in serving]
            receivers = (sender, *[r for r in leaders if r != sender])
            stages.append(StageRoute(s, sender, sender_node, receivers=receivers))
        elif sync == "distributed":
            offsets, next_rank = [], 1
            for slot in servers:
                offsets.append((slot.url, next_rank))
                next_rank += slot.tp
            stages.append(StageRoute(s, sender, sender_node, master_address=addresses[sender_node],
                                     master_port=sync_port_base + s, group_name=f"dm_weights_pp{s}",
                                     world_size=next_rank, rank_offsets=tuple(offsets)))
        else:
            stages.append(StageRoute(s, sender, sender_node))
    return Placement(mode=mode, nodes=nodes, gpus_per_node=gpus_per_node, actor_nodes=actor_nodes,
                     rollout_nodes=serving, addresses=addresses, servers=servers, router_node=router_node,
                     router_host=addresses[router_node], router_port=router_port,
                     router_launcher_rank=0 if mode == "colocated" else None, sync=sync,
                     stages=tuple(stages))
