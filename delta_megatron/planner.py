"""``delta-megatron plan RECIPE --nodes N``: will this layout fit, and where will the step time go?

Per GPU and per phase of the colocated lifecycle (rollout, logprob, train, sync, save), the memory of
every component (weights, fp32 grads, sharded Adam state, activations with the configured recompute,
log-prob chunks, the DelTA ``v`` cache, the SGLang engine's weights and KV pool) — the ledger of
:mod:`delta_megatron.memory_ledger`, which the trainer logs too — and the step-time components
(rollout, old-log-prob pass, DelTA extra forwards and host cache, train fwd+bwd, gradient sync, weight
sync, offload) from FLOP counts and the bandwidths of a cluster profile, with the stages between
preemption checks and the save time. A layout that does not fit is rejected with the component and
the numbers. The model and its check against published numbers are in docs/planner.md; the formulas
are in :mod:`delta_megatron.planner_model`.

The planner reads only the ``hardware:`` section of ``slurm/profiles/<name>.yaml``; launching is the
business of ``launchers/``, which this library never imports.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import pkgutil
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import yaml

from delta_megatron import planner_model as pm
from delta_megatron.config import Config, load_config
from delta_megatron.memory_ledger import HOST_FRACTION, dims, memory_ledger, weight_bytes
from delta_megatron.utils.commands import command_parser
from delta_megatron.utils.configs import ConfigError, Section, apply_overrides, fail, from_dict, option
from delta_megatron.utils.configs import validate as validate_tree

PROFILE_DIR = Path(__file__).resolve().parents[1] / "slurm" / "profiles"


@dataclass
class Hardware(Section):
    """One node type, from a profile's ``hardware:`` section. Bandwidths are per GPU, one direction,
    in GB/s (1e9); memory in GiB; ``*_mfu`` / ``decode_mbu`` are the achieved fractions of peak the
    time model assumes (calibrate them from a measured step, docs/planner.md)."""

    gpu: str = option("H100-SXM", "GPU model (a label; 'cpu' for CPU-only profiles)")
    gpus_per_node: int = option(8, "GPUs (or CPU ranks) per node", ge=1)
    hbm_gib: float = option(80.0, "memory per GPU (GiB)", gt=0)
    reserved_gib: float = option(6.0, "CUDA context, NCCL buffers, allocator fragmentation (GiB)", ge=0)
    bf16_tflops: float = option(989.0, "dense bf16 peak (TFLOP/s)", gt=0)
    fp8_tflops: float = option(1979.0, "dense fp8 peak (TFLOP/s)", gt=0)
    hbm_tbps: float = option(3.35, "memory bandwidth (TB/s)", gt=0)
    nvlink_gbps: float = option(450.0, "intra-node bandwidth per GPU, one direction (GB/s)", gt=0)
    ib_gbps: float = option(50.0, "inter-node bandwidth per GPU, one direction (GB/s)", gt=0)
    host_mem_gib: float = option(2048.0, "host memory per node (GiB)", gt=0)
    host_link_gbps: float = option(50.0, "pinned host <-> GPU copies (PCIe / C2C) per GPU, one direction "
                                         "(GB/s)", gt=0)
    fs_write_gbps: float = option(5.0, "checkpoint write bandwidth per node (GB/s)", gt=0)
    startup_s: float = option(300.0, "job start to the first step: container, model load, SGLang start (s)",
                              ge=0)
    train_mfu: float = option(0.40, "achieved fraction of peak in training", gt=0, le=1)
    forward_mfu: float = option(0.45, "achieved fraction of peak in no-grad forwards", gt=0, le=1)
    decode_mbu: float = option(0.60, "achieved fraction of memory bandwidth in decode", gt=0, le=1)

    def validate(self) -> None:
        if self.reserved_gib >= self.hbm_gib:
            fail("reserved_gib", self.reserved_gib, f"must be < hbm_gib={self.hbm_gib}")


@dataclass
class PlanOptions(Section):
    """What the config does not say: the cluster shape and the length assumptions of the time model.
    Memory is always checked at the worst case (every response at ``rollout.max_new_tokens``)."""

    nodes: int = option(1, "actor nodes", ge=1)
    rollout_nodes: int = option(0, "SGLang nodes; 0 = colocated on the actor GPUs", ge=0)
    recompute: Literal["config", "none", "full", "selective"] = option(
        "config", "activation recompute in training: the config's train.recompute_*, or a what-if")
    mean_response_frac: float = option(0.5, "mean response length / max_new_tokens (time only)", gt=0, le=1)
    mean_prompt_frac: float = option(0.25, "mean prompt length / max_prompt_len (time only)", gt=0, le=1)
    grad_bytes: int = option(4, "bytes per main-grad element (fp32 in actor/optimizer.py)", ge=2, le=4)
    eval_rows: int = option(100, "prompts per eval set when neither eval.max_prompts nor "
                                 "data.max_eval_rows bounds them (time only)", ge=1)

    def validate(self) -> None:
        if self.grad_bytes not in (2, 4):
            fail("grad_bytes", self.grad_bytes, "2 (bf16) or 4 (fp32)")


class PlanError(ValueError):
    """The layout does not fit; ``problems`` lists each failing component with its numbers."""

    def __init__(self, problems: list[str], plan: Plan | None = None):
        self.problems, self.plan = problems, plan
        super().__init__("layout rejected:\n  - " + "\n  - ".join(problems))


@dataclass
class Plan:
    """Per-GPU memory by phase (bytes; the trainer's ledger, memory_ledger.py) and step time by
    component (seconds). ``stages``: seconds between preemption checks; ``save_s``: one checkpoint;
    ``host``: pinned host bytes per GPU; ``choices``: config values the plan resolves (``auto``) or
    estimates, which ``launch`` writes into the job's config."""

    layout: dict[str, Any]
    memory: dict[str, dict[str, float]]
    usable_bytes: float
    time_s: dict[str, float]
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    stages: dict[str, float] = field(default_factory=dict)
    save_s: float = 0.0
    host: dict[str, float] = field(default_factory=dict)
    choices: dict[str, str] = field(default_factory=dict)

    @property
    def fits(self) -> bool:
        return not self.problems

    def peak(self, phase: str) -> float:
        return sum(self.memory[phase].values())

    def check(self) -> Plan:
        if self.problems:
            raise PlanError(self.problems, self)
        return self

    def format(self) -> str:
        lay = self.layout
        where = (f"+{lay['rollout_nodes']} SGLang nodes" if lay["rollout_nodes"] else
                 "SGLang colocated" if lay["engine"] == "sglang" else "embedded rollout")
        lines = [f"plan: {lay['model']} on {lay['nodes']}x{lay['gpus_per_node']} {lay['gpu']} ({where})",
                 f"  params {lay['params'] / 1e9:.2f} B | tp {lay['tp']} pp {lay['pp']} cp {lay['cp']}"
                 f" dp {lay['dp']} | sp {lay['sp']} | recompute {lay['recompute']} | fp8 {lay['fp8']}",
                 f"  rollout: {lay['responses']} responses x <= {lay['seq_max']} tokens;"
                 f" {lay['servers']} SGLang servers (tp {lay['sglang_tp']}),"
                 f" concurrency {lay['concurrency']}/server",
                 f"memory per GPU by phase (GiB, worst case), usable {pm.gib(self.usable_bytes):.1f}:",
                 "  " + f"{'phase':<8}{'total':>7}" + "".join(f"{label:>10}" for label in _COLUMNS.values())]
        for phase, parts in self.memory.items():
            cells = "".join(f"{pm.gib(v):10.1f}" if (v := _column(parts, c)) else f"{'-':>10}" for c in _COLUMNS)
            lines.append(f"  {phase:<8}{pm.gib(self.peak(phase)):7.1f}{cells}")
        if self.host:
            lines.append("  pinned host per GPU: " + ", ".join(f"{k} {pm.gib(v):.1f}" for k, v in self.host.items()))
        total = sum(self.time_s.values())
        lines.append(f"step time (s, mean lengths): {total:.0f}")
        lines += [f"  {k:<16} {v:8.1f}" for k, v in self.time_s.items()]
        if self.stages:
            lines.append("stages between preemption checks (s): " +
                         ", ".join(f"{k} {v:.0f}" for k, v in self.stages.items()))
        lines += [f"note: {n}" for n in self.notes]
        lines.append("verdict: fits" if self.fits else "verdict: DOES NOT FIT\n  - " +
                     "\n  - ".join(self.problems))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"fits": self.fits}


# ----------------------------------------------------------------------------- the model
def plan(cfg: Config, hw: Hardware, opts: PlanOptions) -> Plan:
    """Build the plan; never raises for a layout that does not fit (see ``Plan.check``)."""
    validate_tree(opts)
    validate_tree(hw)
    if not opts.rollout_nodes and cfg.rollout.placement == "disaggregated":  # the config says so itself
        opts = replace(opts, rollout_nodes=cfg.rollout.nodes)
    par, ro, tr, sg = cfg.parallel, cfg.rollout, cfg.train, cfg.rollout.sglang
    if opts.recompute != "config":  # a what-if from the command line
        cfg = apply_overrides(cfg, [f"train.recompute_granularity={opts.recompute}"])
        tr = cfg.train
    m = dims(cfg)
    tp, pp, cp, sp = par.tp, par.pp, par.cp, par.sequence_parallel
    gpus = opts.nodes * hw.gpus_per_node
    problems: list[str] = []
    notes: list[str] = []
    if gpus % (tp * pp * cp):
        problems.append(f"layout: tp*pp*cp = {tp * pp * cp} does not divide {gpus} GPUs "
                        f"({opts.nodes} nodes x {hw.gpus_per_node})")
    if m.kv_heads % tp or m.heads % tp:
        problems.append(f"layout: tp={tp} must divide num_attention_heads={m.heads} and "
                        f"num_key_value_heads={m.kv_heads}")
    if m.layers % pp:
        problems.append(f"layout: pp={pp} must divide num_layers={m.layers}")

    # ---- memory: the ledger the trainer logs (memory_ledger.py)
    usable = (hw.hbm_gib - hw.reserved_gib) * 2**30
    ledger = memory_ledger(cfg, gpus=gpus, hbm_bytes=hw.hbm_gib * 2**30, usable_bytes=usable,
                           rollout_nodes=opts.rollout_nodes, grad_bytes=opts.grad_bytes)
    dp, n_micro = ledger.layout["dp"], ledger.layout["micro_batches"]
    responses, seq_max = ledger.layout["responses"], ledger.layout["seq_max"]
    t_train, t_lp = tr.max_tokens_per_gpu_train, tr.max_tokens_per_gpu_logprob
    if seq_max > t_train * cp:
        problems.append(f"train micro-batch: one sequence of {seq_max} tokens needs "
                        f"{pm.ceil_div(seq_max, cp)} tokens per GPU at cp={cp}, but "
                        f"train.max_tokens_per_gpu_train={t_train}; raise it or parallel.cp")
    if seq_max > t_lp * cp:
        problems.append(f"log-prob micro-batch: one sequence of {seq_max} tokens needs "
                        f"{pm.ceil_div(seq_max, cp)} tokens per GPU at cp={cp}, but "
                        f"train.max_tokens_per_gpu_logprob={t_lp}")
    for phase, parts in ledger.phases.items():
        need = sum(parts.values())
        if need > usable:
            big = max(parts, key=parts.get)
            problems.append(
                f"{phase} phase: needs {pm.human(need)} per GPU > usable {pm.human(usable)} "
                f"({pm.human(hw.hbm_gib * 2**30)} {hw.gpu} - {pm.human(hw.reserved_gib * 2**30)} reserved); "
                f"largest: {big} "
                f"{pm.human(parts[big])}" + _hint(phase, big))
    host_node = sum(ledger.host.values()) * min(gpus, hw.gpus_per_node)
    if host_node > HOST_FRACTION * hw.host_mem_gib * 2**30:
        problems.append(f"host memory: {pm.human(host_node)} pinned per node ({', '.join(ledger.host)}) > "
                        f"{HOST_FRACTION:.0%} of {pm.human(hw.host_mem_gib * 2**30)}; offload less (memory.*) or keep "
                        "credit.delta.cache_device on the gpu")

    # ---- rollout engine capacity
    sgl_tp = sg.tp if ro.engine == "sglang" else tp
    rollout_gpus = opts.rollout_nodes * hw.gpus_per_node if opts.rollout_nodes else gpus
    servers = max(1, rollout_gpus // sgl_tp)
    weights_total = 2 * pm.total_params(m)
    kvb = pm.kv_bytes_per_token(m)
    if ro.engine == "sglang":
        pool = sg.mem_fraction * hw.hbm_gib * 2**30
        kv_capacity_tokens = (pool * sgl_tp - weights_total) / kvb
        if kv_capacity_tokens < seq_max:
            problems.append(
                f"SGLang KV cache: pool {pm.human(pool)}/GPU x tp {sgl_tp} minus weights "
                f"{pm.human(weights_total)} leaves {max(kv_capacity_tokens, 0):.0f} tokens "
                f"({pm.human(kvb)}/token), less than one {seq_max}-token sequence; "
                "raise rollout.sglang.tp or mem_fraction")
    else:
        kv_capacity_tokens = min(ro.batch_size, responses) * seq_max

    # ---- step time
    peak = (hw.fp8_tflops if par.fp8 != "none" else hw.bf16_tflops) * 1e12
    resp_mean = opts.mean_response_frac * ro.max_new_tokens
    prompt_mean = opts.mean_prompt_frac * ro.max_prompt_len
    seq_mean = prompt_mean + resp_mean
    tokens_mean = responses * seq_mean
    engine = _EngineTime(m, hw, ro, sgl_tp, servers, rollout_gpus, kv_capacity_tokens)
    prefill, decode, concurrency = engine.rollout(responses, prompt_mean, resp_mean, ro.max_new_tokens)
    fwd_all = pm.forward_flops(m, int(tokens_mean), max(1, int(seq_mean)))
    t_logprob = fwd_all / (gpus * peak * hw.forward_mfu)
    delta_on = "delta" in cfg.credit.methods
    dcfg = cfg.credit.delta
    extra = 0
    if delta_on:
        extra = {"cache": 0, "moments": dcfg.K + 1, "recompute": dcfg.K + 2}[dcfg.mode]
    bubble = 1 + (pp - 1) / (n_micro * (par.vpp or 1)) if pp > 1 else 1.0
    redo = _recomputed_fraction(cfg, m)
    t_train_s = tr.ppo_epochs * pm.train_flops(m, int(tokens_mean), max(1, int(seq_mean)), "full", redo) / (
        gpus * peak * hw.train_mfu) * bubble
    cross_node = gpus > hw.gpus_per_node and dp * cp > 1
    link = (hw.ib_gbps if cross_node else hw.nvlink_gbps) * 1e9
    wbytes = weight_bytes(cfg)
    p_local = ledger.layout["stage_params"]
    # distributed optimizer per optimizer step: reduce-scatter the grads + all-gather the weights,
    # i.e. the bandwidth of one all-reduce of (grad + weight bytes)/2 per parameter; not overlapped
    grad_sync = tr.mini_batches * tr.ppo_epochs * pm.ring_allreduce_seconds(
        (opts.grad_bytes + wbytes) / 2 * p_local, dp * cp, link)
    if ro.engine == "sglang" and opts.rollout_nodes:
        sync = weights_total / (hw.ib_gbps * 1e9 * hw.gpus_per_node)
    else:
        sync = weights_total / sgl_tp / (hw.nvlink_gbps * 1e9)
    pcie = hw.host_link_gbps * 1e9
    moved = ledger.host.get("optimizer", 0) + ledger.host.get("weights", 0)
    host_cache = ledger.host.get("delta v cache", 0)
    # out during the log-prob pass (overlapped: only what exceeds it), back for each replayed stage
    replays = (dcfg.K + 2) if delta_on else 0
    cache_io = max(0.0, host_cache / pcie - t_logprob) + replays * host_cache / pcie
    time_s = {"rollout prefill": prefill, "rollout decode": decode, "old-logprob pass": t_logprob,
              "delta extra fwd": extra * t_logprob, "delta host cache": cache_io, "train fwd+bwd": t_train_s,
              "dp grad sync": grad_sync, "weight sync": sync, "offload/onload": 2 * moved / pcie}

    # ---- stages between preemption checks, saves, deadlines
    updates = tr.mini_batches * tr.ppo_epochs
    per_update = (t_train_s + grad_sync) / updates
    eval_s = engine.evaluation(cfg, opts) if cfg.eval.every else 0.0
    stages = {"rollout": prefill + decode,
              "log-probs + first update": t_logprob * (1 + extra) + cache_io + moved / pcie + per_update,
              "optimizer step": per_update, "sync": sync + moved / pcie, "eval": eval_s}
    save_s = checkpoint_save_seconds(cfg, hw, opts.nodes)
    worst_rollout = sum(engine.rollout(responses, ro.max_prompt_len, ro.max_new_tokens, ro.max_new_tokens)[:2])
    rank0_only = {"rollout (all responses at max length)": worst_rollout, "eval": eval_s}
    slowest = max(rank0_only, key=rank0_only.get)
    if par.timeout_minutes * 60 < rank0_only[slowest]:
        problems.append(f"parallel.timeout_minutes: {par.timeout_minutes:g} min is shorter than the longest "
                        f"stage only rank 0 works in ({slowest}: {rank0_only[slowest] / 60:.1f} min), during "
                        "which the other ranks wait in a collective; raise it")
    notes.append(f"checkpoint save (weights + Adam) ~{save_s:.0f} s at {hw.fs_write_gbps:g} GB/s/node; "
                 f"longest stage between preemption checks: {max(stages, key=stages.get)} "
                 f"{max(stages.values()):.0f} s")
    if delta_on and dcfg.mode != "cache":
        notes.append(f"DelTA mode {dcfg.mode}: {extra} extra forward passes per rollout batch")
    for key, value in ledger.choices.items():
        notes.append(f"{key}: auto -> {value}")
    layout = dict(model=f"{cfg.model.arch}-d{m.d}-L{m.layers}", gpu=hw.gpu, nodes=opts.nodes,
                  gpus_per_node=hw.gpus_per_node, rollout_nodes=opts.rollout_nodes, engine=ro.engine,
                  params=pm.total_params(m), stage_params=p_local, tp=tp, pp=pp, cp=cp, dp=dp, sp=sp,
                  recompute=tr.recompute_granularity, fp8=par.fp8, responses=responses, seq_max=seq_max,
                  servers=servers, sglang_tp=sgl_tp, concurrency=concurrency, micro_batches=n_micro,
                  colocate=cfg.memory.colocate and not opts.rollout_nodes)
    return Plan(layout, ledger.phases, usable, time_s, problems, notes, stages=stages, save_s=save_s,
                host=ledger.host, choices=ledger.choices | {"checkpoint.save_seconds": f"{max(1, math.ceil(save_s))}"})


class _EngineTime:
    """Rollout (and evaluation) time of the engine: prefill at forward MFU; decode memory-bound on
    weights + KV reads, or compute-bound, per server, with the straggler that runs to max length."""

    def __init__(self, m: pm.Dims, hw: Hardware, ro, sgl_tp: int, servers: int, rollout_gpus: int,
                 kv_capacity_tokens: float):
        self.m, self.hw, self.ro, self.tp, self.servers = m, hw, ro, sgl_tp, servers
        self.gpus, self.capacity = rollout_gpus, kv_capacity_tokens

    def rollout(self, responses: int, prompt_mean: float, resp_mean: float,
                max_new: int) -> tuple[float, float, int]:
        """(prefill s, decode s, concurrency per server) for ``responses`` of the given lengths."""
        m, hw, ro = self.m, self.hw, self.ro
        kvb, n_flops = pm.kv_bytes_per_token(m), pm.flops_params(m)
        weights_total = 2 * pm.total_params(m)
        seqs_per_server = pm.ceil_div(responses, self.servers)
        seq_mean = prompt_mean + resp_mean
        concurrency = max(1, min(seqs_per_server, int(self.capacity // max(seq_mean, 1)),
                                 pm.ceil_div(ro.sglang.max_concurrency, self.servers) if ro.engine == "sglang"
                                 else seqs_per_server))
        ctx = prompt_mean + resp_mean / 2
        hbm, peak = hw.hbm_tbps * 1e12, hw.bf16_tflops * 1e12
        t_step = pm.decode_step_seconds(weights_total / self.tp, concurrency * ctx * kvb / self.tp,
                                        2 * n_flops * concurrency / self.tp, hbm, hw.decode_mbu, peak,
                                        hw.forward_mfu)
        t_step1 = pm.decode_step_seconds(weights_total / self.tp, ctx * kvb / self.tp, 2 * n_flops / self.tp,
                                         hbm, hw.decode_mbu, peak, hw.forward_mfu)
        decode = max(seqs_per_server * resp_mean / concurrency * t_step, max_new * t_step1)
        prefill = responses * pm.forward_flops(m, int(prompt_mean), max(1, int(prompt_mean))) / (
            self.gpus * peak * hw.forward_mfu)
        return prefill, decode, concurrency

    def evaluation(self, cfg: Config, opts: PlanOptions) -> float:
        """One evaluation: every eval set's first ``eval.max_prompts`` (else ``data.max_eval_rows``,
        else ``opts.eval_rows``) prompts x k samples, up to ``eval.max_new_tokens``."""
        rows = cfg.eval.max_prompts or cfg.data.max_eval_rows or opts.eval_rows
        responses = max(1, len(cfg.data.eval)) * rows * cfg.eval.k
        max_new = cfg.eval.max_new_tokens
        prompt = opts.mean_prompt_frac * cfg.rollout.max_prompt_len
        return sum(self.rollout(responses, prompt, opts.mean_response_frac * max_new, max_new)[:2])


def _recomputed_fraction(cfg: Config, m: pm.Dims) -> float:
    """The share of the forward that activation recompute runs again in the train pass."""
    tr = cfg.train
    layers = m.layers // cfg.parallel.pp
    if tr.recompute_granularity == "full":
        return 1.0 if tr.recompute_method == "uniform" else min(tr.recompute_num_layers, layers) / layers
    if tr.recompute_granularity == "selective" and "mlp" in tr.recompute_modules:
        return m.layers * 3 * m.d * m.ffn / pm.flops_params(m)
    return 0.0


def time_problems(result: Plan, time_limit_s: float | None, signal_lead_s: float | None,
                  startup_s: float) -> list[str]:
    """What a scheduler's time limit and preemption-signal lead must cover, by the plan's numbers.

    The trainer stops only at stage boundaries and, before the job's end, once time left < save +
    the longest stage; so a signal must come at least that early, and a job's limit must leave room
    for start-up, one whole step and that margin (else every run redoes the same step)."""
    problems = []
    name, stage = max(result.stages.items(), key=lambda kv: kv[1])
    margin = result.save_s + stage
    if signal_lead_s is not None and signal_lead_s < margin:
        problems.append(f"signal lead: {signal_lead_s:.0f} s before the time limit < save {result.save_s:.0f} s + "
                        f"longest stage ({name} {stage:.0f} s) = {margin:.0f} s; the run would be killed "
                        f"mid-stage: signal at least {pm.ceil_div(int(margin), 60) * 60} s early")
    step = sum(result.time_s.values())
    need = startup_s + step + margin
    if time_limit_s is not None and time_limit_s < need:
        problems.append(f"time limit: {time_limit_s / 3600:.2f} h < start-up {startup_s:.0f} s + one step "
                        f"{step:.0f} s + save and longest stage {margin:.0f} s = {need / 3600:.2f} h: the job "
                        "could not checkpoint a finished step before its limit")
    return problems


# the phase table's columns: ledger component -> header
_COLUMNS = {"weights": "weights", "grads": "grads", "optimizer": "optimizer", "engine weights": "eng.wts",
            "engine kv_cache": "eng.kv", "activations": "activ.", "lm head+chunks": "lm head",
            "forward work": "fwd work", "logit chunks": "logits", "delta v cache": "v cache",
            "sync buffers": "sync buf"}


def _column(parts: dict[str, float], column: str) -> float:
    if column == "weights":
        return parts.get("weights", 0.0) + parts.get("fp8 weights", 0.0)
    return parts.get(column, 0.0)


def checkpoint_bytes(cfg: Config) -> float:
    """Bytes of one trainer checkpoint: the weights in their dtype plus the fp32 main copy and Adam's
    two moments (12 bytes per parameter) — what ``checkpoint.keep`` multiplies on disk."""
    return (weight_bytes(cfg) + 12) * pm.total_params(dims(cfg))


def checkpoint_save_seconds(cfg: Config, hw: Hardware, nodes: int) -> float:
    """Time to write one checkpoint at the profile's per-node filesystem bandwidth."""
    return checkpoint_bytes(cfg) / (hw.fs_write_gbps * 1e9 * nodes)


def _hint(phase: str, component: str) -> str:
    hints = {
        "activations": "; try train.recompute_granularity=full, parallel.cp x2 or a smaller "
                       "train.max_tokens_per_gpu_train",
        "delta v cache": "; try credit.delta.cache_device=host (or auto), cache_dtype=bfloat16, "
                         "parallel.sequence_parallel, or credit.delta.mode=moments (K+1 extra forwards)",
        "engine kv_cache": "; lower rollout.sglang.mem_fraction or give SGLang its own nodes",
        "engine weights": "; raise rollout.sglang.tp or give SGLang its own nodes",
        "sync buffers": "; raise parallel.tp or parallel.pp (the sender gathers its stage's weights)",
        "optimizer": "; memory.offload_optimizer=true (colocated), or more data-parallel ranks",
        "grads": "; raise parallel.tp or parallel.pp",
        "weights": "; raise parallel.tp or parallel.pp",
    }
    return hints.get(component, "")


# ----------------------------------------------------------------------------- inputs
def profile_path(name_or_path: str) -> Path:
    """``b200`` -> slurm/profiles/b200.yaml; a path is taken as is."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    found = PROFILE_DIR / f"{name_or_path}.yaml"
    if not found.exists():
        known = sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))
        raise ConfigError("cluster", name_or_path, "known profiles: " + ", ".join(known))
    return found


def load_hardware(name_or_path: str) -> Hardware:
    data = yaml.safe_load(profile_path(name_or_path).read_text(encoding="utf-8")) or {}
    hw = from_dict(Hardware, data.get("hardware") or {}, "hardware")
    validate_tree(hw, "hardware")
    return hw


def recipe_registry() -> dict[str, Any]:
    """Short recipe names: every ``RECIPES`` dict of the modules in the ``pipelines`` package."""
    try:
        pkg = importlib.import_module("pipelines")
    except ImportError:
        return {}
    found: dict[str, Any] = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"pipelines.{info.name}")
        found.update(getattr(module, "RECIPES", {}))
    return found


def recipe_function(spec: str) -> Callable[..., Any]:
    """``module:function``, or a short name from a ``RECIPES`` registry in ``pipelines``."""
    if ":" in spec:
        module, _, name = spec.partition(":")
        return getattr(importlib.import_module(module), name)
    registry = recipe_registry()
    if spec not in registry:
        raise ConfigError("recipe", spec, "known recipes: " + ", ".join(sorted(registry)))
    return registry[spec]


def call_recipe(fn: Callable[..., Any], **kwargs: Any) -> Any:
    """Call a recipe with the keyword arguments it accepts (e.g. ``nodes``)."""
    accepted = inspect.signature(fn).parameters
    return fn(**{k: v for k, v in kwargs.items() if k in accepted and v is not None})


def load_recipe(spec: str, overrides: list[str] | None = None,
                **kwargs: Any) -> Config | dict[str, Config]:
    """A recipe as a validated Config (or ``{name: Config}`` for a sweep recipe): a YAML path,
    ``module:function``, or a short registry name; ``kwargs`` go to the function if it takes them."""
    if spec.endswith((".yaml", ".yml")):
        return load_config(spec, overrides)
    out = call_recipe(recipe_function(spec), **kwargs)
    configs = out if isinstance(out, dict) else {"": out}
    for name, cfg in configs.items():
        if overrides:
            cfg = configs[name] = apply_overrides(cfg, overrides)
        validate_tree(cfg)
    return configs if isinstance(out, dict) else configs[""]


def main(argv: list[str] | None = None) -> int:
    parser = command_parser(
        "delta-megatron plan",
        "Will this layout fit, and where will the step time go? Per-GPU memory of every component\n"
        "(weights, grads, Adam, activations, log-prob chunks, DelTA cache, SGLang weights and KV) in\n"
        "each phase (rollout, logprob, train, sync, save) at the worst case, and the step time by\n"
        "component, from FLOPs and the cluster profile's bandwidths.",
        """\
        RECIPE: a recipe name (pipelines/*.RECIPES), module:function or a YAML config; --nodes,
        --cluster (slurm/profiles/<name>.yaml hardware section), dotted overrides""",
        """\
        the plan on stdout (or JSON with --json); exit 0 if it fits, 1 if not (each failing component
        named with its numbers and a hint), 2 on a bad config""",
        ["delta-megatron plan qwen3-14b-delta --nodes 2 --cluster b200 parallel.cp=4"])
    parser.add_argument("recipe", help="recipe name, module:function, or a config YAML")
    parser.add_argument("--nodes", type=int, default=1, help="actor nodes")
    parser.add_argument("--cluster", default="b200", help="profile name or YAML path")
    parser.add_argument("--rollout-nodes", type=int, default=0, help="SGLang nodes (0: colocated)")
    parser.add_argument("--recompute", choices=["config", "none", "full", "selective"], default="config",
                        help="what-if: override train.recompute_granularity")
    parser.add_argument("--mean-response-frac", type=float, default=0.5)
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. parallel.tp=4")
    args = parser.parse_intermixed_args(argv)
    try:
        loaded = load_recipe(args.recipe, args.overrides, nodes=args.nodes)
        hw = load_hardware(args.cluster)
        opts = PlanOptions(nodes=args.nodes, rollout_nodes=args.rollout_nodes,
                           recompute=args.recompute, mean_response_frac=args.mean_response_frac)
        runs = loaded if isinstance(loaded, dict) else {args.recipe: loaded}
        results = {name: plan(cfg, hw, opts) for name, cfg in runs.items()}
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for name, result in results.items():
        if args.json:
            print(json.dumps({"recipe": name} | result.to_dict(), indent=1))
        else:
            print(f"== {name}\n{result.format()}" if len(results) > 1 else result.format())
    return 0 if all(r.fits for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
