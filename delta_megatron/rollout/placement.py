"""The runtime side of :mod:`delta_megatron.topology`: resolve every node's routable address, compute
the placement, start this node's SGLang servers (and the router), and give each trainer rank the
rollout pieces it holds — the engine it generates with, and its part of the weight route.

Addresses are resolved, never typed: each rank reports the address its node routes toward the
rendezvous host (``MASTER_ADDR``), or ``DELTA_MEGATRON_NODE_ADDR`` when set; serving-only nodes of a
disaggregated job are listed by the launcher in ``DELTA_MEGATRON_ROLLOUT_HOSTS`` (Slurm: the second
het-group's hostnames). GPUs per node are torchrun's ``LOCAL_WORLD_SIZE``.

Who holds what (``RolloutRuntime``):

* embedded engine: rank 0 holds it; every stage sender broadcasts its buckets to rank 0.
* colocated SGLang: each node's local rank 0 starts its node's servers and holds a client of them
  (the IPC pushes); rank 0 also starts the router. Every data-parallel leader (TP, PP, CP rank 0)
  holds a generation engine (the router, and every worker for pause / flush): it fetches its own
  replica's prompt groups (:mod:`~delta_megatron.dataflow`).
* disaggregated SGLang: the serving nodes start their own servers and router
  (``python -m delta_megatron.cli_serve``); rank 0 waits for the router; data-parallel leaders hold
  generation engines as above; each stage sender holds a client whose ``DistributedSync`` joins its
  stage's group with every server.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from delta_megatron.parallel import fail_together
from delta_megatron.rollout.engine import RolloutError
from delta_megatron.topology import Placement, place

__all__ = ["NODE_ADDR_ENV", "ROLLOUT_HOSTS_ENV", "node_address", "local_world_size", "placement_for",
           "resolve_placement", "RolloutRuntime", "build_rollout_runtime", "together"]

NODE_ADDR_ENV = "DELTA_MEGATRON_NODE_ADDR"
ROLLOUT_HOSTS_ENV = "DELTA_MEGATRON_ROLLOUT_HOSTS"


def node_address() -> str:
    """This node's address as the other nodes reach it: ``DELTA_MEGATRON_NODE_ADDR``, else the local
    address of the route toward ``MASTER_ADDR`` (a UDP ``connect`` sends nothing), else 127.0.0.1."""
    if os.environ.get(NODE_ADDR_ENV):
        return os.environ[NODE_ADDR_ENV]
    master = os.environ.get("MASTER_ADDR")
    if not master:
        return "127.0.0.1"
    try:
        infos = socket.getaddrinfo(master, int(os.environ.get("MASTER_PORT", "29500")), socket.AF_INET,
                                   socket.SOCK_DGRAM)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(infos[0][4])
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def local_world_size() -> int:
    """Trainer ranks on this node (torchrun's LOCAL_WORLD_SIZE; 1 without a launcher)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def together(fn: Callable[[], Any], what: str, group=None) -> Any:
    """Run ``fn`` on every rank; if it fails anywhere, every rank raises one RolloutError naming the
    failing ranks (no rank is left waiting in a later collective). ``group``: the process group the
    ranks wait in (one with a timeout longer than ``fn`` may take)."""
    error, result = None, None
    try:
        result = fn()
    except Exception as err:
        error = err
    fail_together(error, what, RolloutError, group)
    return result


def placement_for(rollout, parallel, *, nodes: int, gpus_per_node: int,
                  addresses: list[str] | tuple[str, ...] | None = None) -> Placement:
    """:func:`~delta_megatron.topology.place` from the config sections (``rollout``, ``parallel``)."""
    sg = rollout.sglang
    return place(nodes=nodes, gpus_per_node=gpus_per_node, tp=parallel.tp, pp=parallel.pp, cp=parallel.cp,
                 mode=rollout.placement, rollout_nodes=rollout.nodes, sglang_tp=sg.tp,
                 dp_attention=sg.dp_attention, servers_per_node=sg.servers_per_node, port_base=sg.port_base,
                 port_stride=sg.port_stride, router_port=sg.router_port, sync_port_base=sg.sync_port_base,
                 weight_sync=sg.weight_sync, addresses=addresses)


def resolve_placement(rollout, parallel) -> Placement:
    """The placement of this run, computed identically on every rank (collective)."""
    g, world = local_world_size(), _world()
    if world % g:
        raise RolloutError(f"world size {world} is not a multiple of LOCAL_WORLD_SIZE={g}")
    mine = node_address()
    addresses = [mine] * world
    if world > 1:
        dist.all_gather_object(addresses, mine)
    actor = [addresses[n * g] for n in range(world // g)]
    for n in range(world // g):  # every rank of a node must agree on the node's address
        if len(set(addresses[n * g:(n + 1) * g])) != 1:
            raise RolloutError(f"node {n}: its ranks report different addresses {addresses[n * g:(n + 1) * g]} "
                               f"(set {NODE_ADDR_ENV} per node)")
    hosts: list[str] = []
    if rollout.placement == "disaggregated":
        hosts = [h for h in os.environ.get(ROLLOUT_HOSTS_ENV, "").split(",") if h]
        if len(hosts) != rollout.nodes:
            raise RolloutError(f"rollout.nodes={rollout.nodes} serving nodes, but {ROLLOUT_HOSTS_ENV} lists "
                               f"{hosts or 'none'}: the launcher exports the serving nodes' addresses")
    return placement_for(rollout, parallel, nodes=len(actor) + len(hosts), gpus_per_node=g,
                         addresses=[*actor, *hosts])


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@dataclass
class RolloutRuntime:
    """This rank's rollout pieces: ``engine`` (generation; None on ranks that do not generate), the
    weight ``route`` (every rank takes part), and what it started."""

    engine: Any
    route: Any
    placement: Placement | None = None
    clients: list[Any] = field(default_factory=list)  # node / sender clients (closed with the runtime)
    started: list[Any] = field(default_factory=list)  # ServerGroups and routers this rank started

    def sync_weights(self, actor) -> int:
        return self.route.sync(actor)

    def close(self) -> None:
        for item in [self.engine, *self.clients, self.route, *self.started[::-1]]:
            if item is None:
                continue
            try:
                item.close() if hasattr(item, "close") else item.stop()
            except Exception:  # best effort at shutdown: the servers may be gone already
                pass


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def build_rollout_runtime(rollout, parallel, groups, *, model_path: str | None, log_dir: str | Path,
                          embedded: Callable[[], Any] | None = None,
                          base_model_path: str | None = None, context_len: int | None = None) -> RolloutRuntime:
    """Collective over every trainer rank. ``embedded()`` builds the in-process engine (rank 0);
    ``context_len`` (the model's max_position_embeddings) caps generation on the servers."""
    from delta_megatron.rollout.weight_route import BroadcastRoute, stage_senders

    bucket_bytes = rollout.sglang.sync_bucket_mb << 20
    senders = stage_senders(groups)
    rank = _rank()
    if rollout.engine == "embedded":
        engine = embedded() if rank == 0 else None
        route = BroadcastRoute(groups, [0], engine.update_weights if engine is not None else None,
                               bucket_bytes=bucket_bytes, device=_device(), senders=senders)
        return RolloutRuntime(engine, route)
    if model_path is None:
        raise RolloutError("rollout.engine: 'sglang' — SGLang servers start from an HF checkpoint; "
                           "set model.hf_path")
    placement = resolve_placement(rollout, parallel)
    if rank == 0:
        print(placement.describe(), file=sys.stderr, flush=True)
    runtime = RolloutRuntime(None, None, placement)
    # servers may take longer to start than a collective may wait: the other ranks wait in a group of
    # their own whose timeout covers a server start and the router's
    waiting = (dist.new_group(backend="gloo", timeout=timedelta(seconds=2 * rollout.sglang.startup_timeout_s + 60))
               if _world() > 1 else None)
    try:
        _start(runtime, rollout, placement, rank, model_path, Path(log_dir) / "sglang", waiting)
        _connect(runtime, rollout, placement, groups, senders, rank, bucket_bytes, log_dir,
                 base_model_path or model_path, context_len)
    except BaseException:
        runtime.close()
        raise
    return runtime


def _start(runtime: RolloutRuntime, rollout, placement: Placement, rank: int, model_path: str,
           log_dir: Path, group) -> None:
    """Colocated: node leaders start their servers, then rank 0 the router. Disaggregated: wait
    for the router the serving nodes started."""
    from delta_megatron.rollout.sglang_server import launch_router, launch_servers, wait_healthy

    sg = rollout.sglang
    if placement.mode == "colocated":
        def servers():
            slots = placement.launched_by(rank)
            if slots:
                runtime.started.append(launch_servers(model_path, sg, slots, log_dir=log_dir,
                                                      startup_timeout_s=sg.startup_timeout_s))
        together(servers, "starting the SGLang servers", group)

        def router():
            if rank == placement.router_launcher_rank:
                runtime.started.append(launch_router(placement.worker_urls, host=placement.router_host,
                                                     port=placement.router_port, log_dir=log_dir,
                                                     startup_timeout_s=sg.startup_timeout_s))
        together(router, "starting sglang_router", group)
    else:
        def wait():
            if rank == 0:
                wait_healthy(placement.router_url, timeout_s=sg.startup_timeout_s, poll_s=1.0,
                             expect_workers=len(placement.servers))
        together(wait, f"waiting for the serving nodes' router {placement.router_url}", group)


def _connect(runtime: RolloutRuntime, rollout, placement: Placement, groups, senders: list[int], rank: int,
             bucket_bytes: int, log_dir, base_model_path: str, context_len: int | None) -> None:
    from delta_megatron.rollout.sglang_engine import SGLangEngine
    from delta_megatron.rollout.weight_route import BroadcastRoute, DiskRoute, DistributedRoute
    from delta_megatron.rollout.weight_sync import DistributedSync, TensorSync

    sg = rollout.sglang
    planned = [st.sender_rank for st in placement.stages]
    if planned != senders:
        raise RolloutError(f"stage senders {senders} differ from the placement's {planned}: megatron's rank "
                           "order is not tp-cp-dp-pp")
    if groups.tp_rank == 0 and groups.pp_rank == 0 and groups.cp_rank == 0:  # each DP replica generates
        runtime.engine = SGLangEngine(placement.router_url, placement.worker_urls, config=sg,
                                      context_len=context_len)
    if placement.sync == "ipc":
        node = rank // placement.gpus_per_node
        consumer = None
        if rank == placement.node_leader(node) and placement.servers_on(node):
            client = SGLangEngine(None, [s.url for s in placement.servers_on(node)], config=sg,
                                  weight_sync=TensorSync(sg.sync_bucket_mb, tp_size=sg.tp))
            runtime.clients.append(client)
            consumer = client.update_weights
        runtime.route = BroadcastRoute(groups, list(placement.stages[0].receivers), consumer,
                                       bucket_bytes=bucket_bytes, device=_device(), senders=senders)
        return
    stage = senders.index(rank) if rank in senders else None
    client = None
    if stage is not None:
        route = placement.stages[stage]
        weight_sync = None
        if placement.sync == "distributed":
            if _is_loopback(route.master_address) and not all(_is_loopback(s.host) for s in placement.servers):
                raise RolloutError(f"pp stage {stage}: the sender's address {route.master_address} is not "
                                   f"reachable from the serving nodes (set {NODE_ADDR_ENV})")
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            weight_sync = DistributedSync(route.master_address, route.master_port, tp_size=sg.tp, pp_rank=stage,
                                          group_name="dm_weights", backend=backend, bucket_mb=sg.sync_bucket_mb,
                                          timeout_s=sg.request_timeout_s)
        client = SGLangEngine(None, placement.worker_urls, config=sg, weight_sync=weight_sync)
        runtime.clients.append(client)
    if placement.sync == "distributed":
        runtime.route = DistributedRoute(groups, engine=runtime.engine, sender_engine=client,
                                         bucket_bytes=bucket_bytes, senders=senders)
    else:
        directory = sg.sync_dir or str(Path(log_dir) / "weight_sync")
        runtime.route = DiskRoute(groups, directory, engine=runtime.engine, base_model_path=base_model_path,
                                  bucket_bytes=bucket_bytes, senders=senders,
                                  checker=client if (client is not None and sg.check_weights) else None)

