"""Scale-up sweeps: one recipe over node counts and TP/PP/CP grids, as one ``run.Experiment``.

Every grid point is a copy of the recipe's config with ``parallel.{tp,pp,cp}`` set (sequence
parallelism on whenever tp > 1) and its own node count. Points that cannot work are dropped before
anything is submitted, each with the reason: layouts that do not divide the GPUs or the model, and
layouts the planner rejects (memory), so a sweep never spends an allocation on a certain OOM.

    delta-megatron launch qwen3-14b-delta --executor slurm --cluster b200 \
        --sweep-nodes 1,2,4,8 --sweep-tp 2,4,8 --sweep-cp 1,2 --dry-run
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass

from delta_megatron.config import Config
from delta_megatron.planner import Hardware, PlanOptions, plan
from delta_megatron.utils.configs import ConfigError, validate


@dataclass
class SweepPoint:
    name: str
    nodes: int
    cfg: Config


@dataclass
class Skipped:
    name: str
    reason: str


def parse_grid(text: str | None, default: int) -> list[int]:
    """``"1,2,4"`` -> [1, 2, 4]; ``None`` -> [default]."""
    if not text:
        return [default]
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError("sweep", text, "a comma-separated list of integers") from None
    if not values or min(values) < 1:
        raise ConfigError("sweep", text, "integers >= 1")
    return values


def scale_points(base: Config, name: str, hw: Hardware, *, nodes: list[int], tp: list[int],
                 pp: list[int], cp: list[int], check_plan: bool = True
                 ) -> tuple[list[SweepPoint], list[Skipped]]:
    """The grid ``nodes x tp x pp x cp`` minus the points that cannot run (with reasons)."""
    points, skipped = [], []
    for n, t, p, c in itertools.product(nodes, tp, pp, cp):
        label = f"{name}-n{n}-tp{t}-pp{p}-cp{c}"
        cfg = copy.deepcopy(base)
        cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.cp = t, p, c
        cfg.parallel.sequence_parallel = t > 1
        if cfg.parallel.vpp and p < 2:
            cfg.parallel.vpp = None
        gpus = n * hw.gpus_per_node
        if gpus % (t * p * c):
            skipped.append(Skipped(label, f"tp*pp*cp={t * p * c} does not divide {gpus} GPUs"))
            continue
        try:
            validate(cfg)
        except ConfigError as err:
            skipped.append(Skipped(label, str(err)))
            continue
        if check_plan:
            result = plan(cfg, hw, PlanOptions(nodes=n))
            if not result.fits:
                skipped.append(Skipped(label, "planner: " + "; ".join(result.problems)))
                continue
        points.append(SweepPoint(label, n, cfg))
    return points, skipped
