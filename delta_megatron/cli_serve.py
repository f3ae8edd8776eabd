"""``python -m delta_megatron.cli_serve``: one serving node of a disaggregated run (``rollout.placement:
disaggregated``) — starts this node's SGLang servers on its own address, and the router on the first
serving node, from the run's config and the placement (:func:`delta_megatron.topology.place`), then
waits until it is told to stop (SIGTERM / SIGINT), stopping its children.

    DELTA_MEGATRON_ROLLOUT_HOSTS=node3,node4 python -m delta_megatron.cli_serve --config run.yaml \\
        --actor-nodes 2 --gpus-per-node 8 [--node-index K] [dotted.overrides ...]

``--node-index`` defaults to ``$SLURM_NODEID`` (the node's index inside the rollout het-group), else
to this node's address (``DELTA_MEGATRON_NODE_ADDR``, else the hostname) found in the hosts list.
The trainer (``torchrun`` on the actor nodes, same config and hosts) waits for the router.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from pathlib import Path

from delta_megatron.config import load_run_config
from delta_megatron.rollout.placement import NODE_ADDR_ENV, ROLLOUT_HOSTS_ENV, placement_for
from delta_megatron.rollout.sglang_server import launch_router, launch_servers
from delta_megatron.utils.commands import command_parser


def _is_local(host: str) -> bool:
    """``host`` names an address of this machine (binding to it succeeds)."""
    try:
        with socket.socket() as s:
            s.bind((socket.gethostbyname(host), 0))
        return True
    except OSError:
        return False


def _node_index(args, hosts: list[str]) -> int:
    """--node-index, else $SLURM_NODEID, else this node's address or hostname in the hosts list, else
    the one host that is an address of this machine."""
    if args.node_index is not None:
        return args.node_index
    if os.environ.get("SLURM_NODEID"):
        return int(os.environ["SLURM_NODEID"])
    me = os.environ.get(NODE_ADDR_ENV) or socket.gethostname()
    if me in hosts:
        return hosts.index(me)
    local = [i for i, h in enumerate(hosts) if _is_local(h)]
    if len(local) != 1:
        raise SystemExit(f"cli_serve: cannot tell which of {ROLLOUT_HOSTS_ENV}={hosts} is this node ({me}); "
                         "pass --node-index")
    return local[0]


def main(argv: list[str] | None = None) -> int:
    parser = command_parser(
        "delta-megatron serve",
        "One serving node of a disaggregated run (rollout.placement: disaggregated): starts this node's\n"
        "SGLang servers on its own address, and the router on the first serving node, from the run's\n"
        "config and the placement; runs until SIGTERM / SIGINT, then stops them. The trainer (torchrun\n"
        "on the actor nodes, same config and hosts) waits for the router.",
        f"""\
        --config YAML or --recipe module:function (the run's), dotted overrides; {ROLLOUT_HOSTS_ENV}
        (the serving nodes' addresses, comma-separated); --node-index, else $SLURM_NODEID, else this
        node's address ({NODE_ADDR_ENV} or the hostname) found in that list""",
        """\
        the servers' and router's logs under --log-dir (default <logging.dir>/sglang); one line
        "SERVING node K (ADDR): URLS; router URL" on stdout once they answer /health""",
        ["delta-megatron serve --config run.yaml --actor-nodes 2 --gpus-per-node 8   "
         f"# with {ROLLOUT_HOSTS_ENV}=node3,node4"])
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--config", help="the run's YAML config")
    src.add_argument("--recipe", help="module:function returning the run's Config")
    parser.add_argument("--actor-nodes", type=int, required=True, help="nodes the trainer runs on")
    parser.add_argument("--gpus-per-node", type=int, required=True)
    parser.add_argument("--node-index", type=int, default=None, help="this node among the serving nodes")
    parser.add_argument("--log-dir", default=None, help="server logs (default: <logging.dir>/sglang)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)
    cfg = load_run_config(args.config, args.recipe, args.overrides)
    if cfg.rollout.placement != "disaggregated":
        parser.error("rollout.placement must be 'disaggregated' (colocated servers are started by the trainer)")
    hosts = [h for h in os.environ.get(ROLLOUT_HOSTS_ENV, "").split(",") if h]
    if len(hosts) != cfg.rollout.nodes:
        parser.error(f"{ROLLOUT_HOSTS_ENV} must list rollout.nodes={cfg.rollout.nodes} serving nodes, got {hosts}")
    placement = placement_for(cfg.rollout, cfg.parallel, nodes=args.actor_nodes + len(hosts),
                              gpus_per_node=args.gpus_per_node,
                              addresses=[f"actor{i}" for i in range(args.actor_nodes)] + hosts)
    node = placement.rollout_nodes[_node_index(args, hosts)]
    log_dir = Path(args.log_dir or Path(cfg.logging.dir) / "sglang")
    sg = cfg.rollout.sglang
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    started = [launch_servers(cfg.model.hf_path, sg, placement.servers_on(node), log_dir=log_dir,
                              startup_timeout_s=sg.startup_timeout_s)]
    try:
        if node == placement.router_node:
            started.append(launch_router(placement.worker_urls, host=placement.router_host,
                                         port=placement.router_port, log_dir=log_dir,
                                         startup_timeout_s=sg.startup_timeout_s))
        print(f"SERVING node {node} ({placement.addresses[node]}): "
              f"{', '.join(s.url for s in placement.servers_on(node))}"
              + (f"; router {placement.router_url}" if node == placement.router_node else ""), flush=True)
        stop.wait()
    finally:
        for item in started[::-1]:
            item.close() if hasattr(item, "close") else item.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
