"""The placement function: which node runs which servers, who starts them, where the router is, how
weights travel — for 1/2/4/8 nodes and SGLang TP 1/2/4/8, and invalid layouts failing by field."""

from __future__ import annotations

import itertools

import pytest

from delta_megatron.topology import place, stage_sender_rank
from delta_megatron.utils.configs import ConfigError

ADDR = tuple(f"10.0.0.{i + 1}" for i in range(8))


@pytest.mark.parametrize("nodes, sglang_tp", list(itertools.product([1, 2, 4, 8], [1, 2, 4, 8])))
def test_colocated_fills_every_node_with_its_own_gpus(nodes, sglang_tp):
    p = place(nodes=nodes, gpus_per_node=8, tp=2, pp=1, sglang_tp=sglang_tp, addresses=ADDR[:nodes])
    per_node = 8 // sglang_tp
    assert len(p.servers) == nodes * per_node
    for n in range(nodes):
        mine = p.servers_on(n)
        # GPU ids are node-local (never >= 8) and every GPU of the node serves exactly once
        assert sorted(g for s in mine for g in s.gpu_ids) == list(range(8))
        assert [s.base_gpu_id for s in mine] == [i * sglang_tp for i in range(per_node)]
        assert {s.host for s in mine} == {ADDR[n]}  # the node's routable address, not 127.0.0.1
        assert {s.launcher_rank for s in mine} == {8 * n}  # the node's local rank 0
        assert [s.port for s in mine] == [30000 + i for i in range(per_node)]
        assert p.launched_by(8 * n) == mine and p.launched_by(8 * n + 1) == []
    assert len(set(p.worker_urls)) == len(p.servers)
    assert (p.router_node, p.router_url, p.router_launcher_rank) == (0, "http://10.0.0.1:29000", 0)
    assert p.sync == "ipc" and p.actor_nodes == p.rollout_nodes == tuple(range(nodes))
    (stage,) = p.stages
    assert stage.sender_rank == 0 and stage.receivers == tuple(8 * n for n in range(nodes))


@pytest.mark.parametrize("nodes", [1, 2, 4, 8])
@pytest.mark.parametrize("pp", [1, 2, 4])
def test_colocated_stage_senders_feed_every_node_leader(nodes, pp):
    tp = 2
    if nodes * 8 % (tp * pp):
        pytest.skip("layout does not divide")
    p = place(nodes=nodes, gpus_per_node=8, tp=tp, pp=pp, addresses=ADDR[:nodes])
    dp = nodes * 8 // (tp * pp)
    leaders = {8 * n for n in range(nodes)}
    for s, st in enumerate(p.stages):
        assert st.sender_rank == s * tp * dp == stage_sender_rank(s, tp, 1, dp)
        assert st.sender_node == st.sender_rank // 8
        assert st.receivers[0] == st.sender_rank and set(st.receivers[1:]) == leaders - {st.sender_rank}


@pytest.mark.parametrize("nodes, rollout_nodes", [(2, 1), (4, 1), (4, 2), (8, 4)])
@pytest.mark.parametrize("sglang_tp", [1, 2, 4, 8])
def test_disaggregated_serves_from_the_last_nodes_over_per_stage_groups(nodes, rollout_nodes, sglang_tp):
    pp = 2
    p = place(nodes=nodes, gpus_per_node=8, tp=2, pp=pp, mode="disaggregated", rollout_nodes=rollout_nodes,
              sglang_tp=sglang_tp, addresses=ADDR[:nodes])
    actor = nodes - rollout_nodes
    assert p.actor_nodes == tuple(range(actor)) and p.rollout_nodes == tuple(range(actor, nodes))
    assert {s.node for s in p.servers} == set(p.rollout_nodes)
    assert all(s.launcher_rank is None for s in p.servers)  # the serving nodes start their own
    assert (p.router_node, p.router_host, p.router_launcher_rank) == (actor, ADDR[actor], None)
    assert p.sync == "distributed"
    dp = actor * 8 // (2 * pp)
    for s, st in enumerate(p.stages):
        assert st.sender_rank == s * 2 * dp and st.sender_rank < actor * 8  # a trainer rank
        assert st.master_address == ADDR[st.sender_node] and st.master_port == 29100 + s
        assert st.group_name == f"dm_weights_pp{s}"
        # rank 0 is the sender; every server TP rank gets its own rank, offsets back to back
        assert st.world_size == 1 + rollout_nodes * 8
        assert [o for _, o in st.rank_offsets] == [1 + i * sglang_tp for i in range(len(p.servers))]
        assert [u for u, _ in st.rank_offsets] == p.worker_urls


def test_one_node_defaults_and_the_table():
    p = place(nodes=1, gpus_per_node=1)
    assert [s.url for s in p.servers] == ["http://node0:30000"]
    text = p.describe()
    assert "node 0 (node0): actor+rollout; servers http://node0:30000 gpus 0" in text
    assert "pp stage 0: sender rank 0 (node 0) -> ranks [0]" in text


def test_servers_per_node_dp_attention_disk_and_port_stride():
    p = place(nodes=2, gpus_per_node=8, sglang_tp=4, dp_attention=2, servers_per_node=1, port_stride=10,
              weight_sync="disk", addresses=ADDR[:2])
    assert [(s.node, s.gpu_ids, s.port, s.dp_attention) for s in p.servers] == [
        (0, (0, 1, 2, 3), 30000, 2), (1, (0, 1, 2, 3), 30000, 2)]
    assert p.sync == "disk" and p.stages[0].receivers == () and p.stages[0].master_address is None
    p = place(nodes=1, gpus_per_node=8, sglang_tp=2, port_stride=10)
    assert [s.port for s in p.servers] == [30000, 30010, 30020, 30030]


@pytest.mark.parametrize("kwargs, path, fragment", [
    (dict(nodes=0, gpus_per_node=8), "nodes", "must be >= 1"),
    (dict(nodes=2, gpus_per_node=0), "gpus_per_node", "must be >= 1"),
    (dict(nodes=2, gpus_per_node=8, tp=3), "parallel.tp", "tp*pp*cp = 3*1*1 must divide the actor's 16 ranks"),
    (dict(nodes=2, gpus_per_node=8, mode="disaggregated", rollout_nodes=1, pp=16), "parallel.tp",
     "must divide the actor's 8 ranks"),
    (dict(nodes=2, gpus_per_node=8, sglang_tp=16), "rollout.sglang.tp", "must divide gpus_per_node=8"),
    (dict(nodes=2, gpus_per_node=8, sglang_tp=3), "rollout.sglang.tp", "must divide gpus_per_node=8"),
    (dict(nodes=2, gpus_per_node=8, sglang_tp=4, dp_attention=3), "rollout.sglang.dp_attention",
     "must divide rollout.sglang.tp=4"),
    (dict(nodes=2, gpus_per_node=8, sglang_tp=4, servers_per_node=3), "rollout.sglang.servers_per_node",
     "servers_per_node * tp must be <= gpus_per_node=8"),
    (dict(nodes=2, gpus_per_node=8, rollout_nodes=1), "rollout.nodes", "must be 0 with rollout.placement"),
    (dict(nodes=2, gpus_per_node=8, mode="disaggregated", rollout_nodes=2), "rollout.nodes",
     "1 <= rollout.nodes < nodes=2"),
    (dict(nodes=2, gpus_per_node=8, mode="disaggregated", rollout_nodes=0), "rollout.nodes", "1 <= rollout.nodes"),
    (dict(nodes=2, gpus_per_node=8, mode="ring"), "rollout.placement", "'colocated', 'disaggregated'"),
    (dict(nodes=2, gpus_per_node=8, mode="disaggregated", rollout_nodes=1, weight_sync="ipc"),
     "rollout.sglang.weight_sync", "ipc needs rollout.placement: colocated"),
    (dict(nodes=2, gpus_per_node=8, weight_sync="nccl"), "rollout.sglang.weight_sync", "'distributed'"),
    (dict(nodes=2, gpus_per_node=8, router_port=30002), "rollout.sglang.router_port", "collides"),
    (dict(nodes=2, gpus_per_node=8, mode="disaggregated", rollout_nodes=1, pp=2, sync_port_base=29999,
          router_port=29000, port_base=30000), "rollout.sglang.sync_port_base", "collides"),
    (dict(nodes=2, gpus_per_node=8, addresses=("a",)), "addresses", "one address per node (2)"),
])
def test_invalid_layouts_name_the_field(kwargs, path, fragment):
    with pytest.raises(ConfigError) as err:
        place(**kwargs)
    assert err.value.path == path and fragment in str(err.value), str(err.value)


def test_config_section_rejects_inconsistent_placement():
    from delta_megatron.config import load_config

    with pytest.raises(ConfigError, match=r"rollout.nodes: 0 — placement: disaggregated needs >= 1"):
        load_config(overrides=["rollout.engine=sglang", "rollout.placement=disaggregated"])
    with pytest.raises(ConfigError, match=r"rollout.placement: 'disaggregated' — disaggregated needs engine"):
        load_config(overrides=["rollout.placement=disaggregated", "rollout.nodes=1"])
    with pytest.raises(ConfigError, match=r"rollout.sglang.dp_attention: 3 — must divide tp=4"):
        load_config(overrides=["rollout.sglang.tp=4", "rollout.sglang.dp_attention=3"])
    with pytest.raises(ConfigError, match=r"rollout.sglang.sync_bucket_mb: 0 — must be >= 1"):
        load_config(overrides=["rollout.sglang.sync_bucket_mb=0"])
