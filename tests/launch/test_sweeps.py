"""Scale-up sweep grids: impossible points are dropped with the reason, the rest keep their nodes."""

from __future__ import annotations

import pytest

from delta_megatron.topology import place
from launchers.sweeps import parse_grid, scale_points
from tests.launch.test_planner import HW, tiny_config


def test_grid_drops_what_cannot_run():
    points, skipped = scale_points(tiny_config(0.2), "t", HW, nodes=[1, 2], tp=[1, 2, 3], pp=[1], cp=[1])
    assert [(p.name, p.nodes, p.cfg.parallel.tp, p.cfg.parallel.sequence_parallel)
            for p in points] == [("t-n1-tp2-pp1-cp1", 1, 2, True), ("t-n2-tp1-pp1-cp1", 2, 1, False),
                                 ("t-n2-tp2-pp1-cp1", 2, 2, True)]
    servers = [len(place(nodes=p.nodes, gpus_per_node=HW.gpus_per_node, tp=p.cfg.parallel.tp,
                         sglang_tp=p.cfg.rollout.sglang.tp).servers) for p in points]
    assert servers == [4, 8, 8]  # colocated, the default servers_per_node=0 fills every GPU
    reasons = {s.name: s.reason for s in skipped}
    assert reasons["t-n1-tp3-pp1-cp1"] == "tp*pp*cp=3 does not divide 4 GPUs"
    assert reasons["t-n2-tp3-pp1-cp1"] == "tp*pp*cp=3 does not divide 8 GPUs"
    # tp=1 leaves the whole model on every GPU; on one node (dp 4) training does not fit:
    # 173824 + 347648 + 260736 (Adam / 4) + activations 59904 + LM head 8448 = 850560 B
    assert reasons["t-n1-tp1-pp1-cp1"].startswith("planner: logprob phase: needs 801.4 KiB")
    assert "; train phase: needs 830.6 KiB" in reasons["t-n1-tp1-pp1-cp1"]
    # two nodes (dp 8) halve the Adam state; colocated SGLang fits next to the actor's weights alone
    assert len(points) + len(skipped) == 6


def test_parse_grid():
    assert parse_grid("1,2,4, 8", 1) == [1, 2, 4, 8]
    assert parse_grid(None, 3) == [3]
    with pytest.raises(ValueError, match="comma-separated"):
        parse_grid("1,x", 1)
