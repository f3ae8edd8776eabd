"""``delta-megatron plan RECIPE --nodes N``: will this layout fit, and where will the step time go?

Estimates, per GPU, the memory of every component (weights, fp32 grads, sharded Adam state,
activations with/without recompute, log-prob chunks, the DelTA ``v`` cache, the colocated SGLang pool)
and the step-time components (rollout decode, old-log-prob pass, DelTA extra forwards, train fwd+bwd,
gradient sync, weight sync) from FLOP counts and the bandwidths of a cluster profile. A layout that
does not fit is rejected with the component and the numbers. The model and its check against
published numbers are in docs/planner.md; the formulas are in :mod:`delta_megatron.planner_model`.

The planner reads only the ``hardware:`` section of ``slurm/profiles/<name>.yaml``; launching is the
business of ``launchers/``, which this library never imports.
"""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from delta_megatron import planner_model as pm
from delta_megatron.config import Config, load_config
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
    fs_write_gbps: float = option(5.0, "checkpoint write bandwidth per node (GB/s)", gt=0)
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
    recompute: Literal["none", "full"] = option("none", "activation recompute in training")
    mean_response_frac: float = option(0.5, "mean response length / max_new_tokens (time only)", gt=0, le=1)
    mean_prompt_frac: float = option(0.25, "mean prompt length / max_prompt_len (time only)", gt=0, le=1)
    grad_bytes: int = option(4, "bytes per main-grad element (fp32 in actor/optimizer.py)", ge=2, le=4)

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
    """Per-GPU memory by phase (bytes) and step time by component (seconds)."""

    layout: dict[str, Any]
    memory: dict[str, dict[str, float]]
    usable_bytes: float
    time_s: dict[str, float]
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

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
                 f"memory per GPU (GiB, worst case), usable {pm.gib(self.usable_bytes):.1f}:"]
        for phase, parts in self.memory.items():
            detail = ", ".join(f"{k} {pm.gib(v):.1f}" for k, v in parts.items())
            lines.append(f"  {phase:<9} {pm.gib(self.peak(phase)):7.1f}  = {detail}")
        total = sum(self.time_s.values())
        lines.append(f"step time (s, mean lengths): {total:.0f}")
        lines += [f"  {k:<16} {v:8.1f}" for k, v in self.time_s.items()]
        lines += [f"note: {n}" for n in self.notes]
        lines.append("verdict: fits" if self.fits else "verdict: DOES NOT FIT\n  - " +
                     "\n  - ".join(self.problems))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"fits": self.fits}


# ----------------------------------------------------------------------------- the model
def dims(cfg: Config) -> pm.Dims:
    m = cfg.model
    tp = cfg.parallel.tp
    return pm.Dims(d=m.hidden_size, layers=m.num_layers, heads=m.num_attention_heads,
                   kv_heads=m.num_key_value_heads, head_dim=m.kv_channels, ffn=m.intermediate_size,
                   vocab=-(-m.vocab_size // tp) * tp, tied=m.tie_word_embeddings,
                   qk_norm=m.use_qk_norm, qkv_bias=m.use_qkv_bias)


def plan(cfg: Config, hw: Hardware, opts: PlanOptions) -> Plan:
    """Build the plan; never raises for a layout that does not fit (see ``Plan.check``)."""
    validate_tree(opts)
    validate_tree(hw)
    par, ro, tr, sg = cfg.parallel, cfg.rollout, cfg.train, cfg.rollout.sglang
    m = dims(cfg)
    tp, pp, cp, sp = par.tp, par.pp, par.cp, par.sequence_parallel
    gpus = opts.nodes * hw.gpus_per_node
    problems: list[str] = []
    notes: list[str] = []
    if gpus % (tp * pp * cp):
        problems.append(f"layout: tp*pp*cp = {tp * pp * cp} does not divide {gpus} GPUs "
                        f"({opts.nodes} nodes x {hw.gpus_per_node})")
    dp = max(1, gpus // (tp * pp * cp))
    if m.kv_heads % tp or m.heads % tp:
        problems.append(f"layout: tp={tp} must divide num_attention_heads={m.heads} and "
                        f"num_key_value_heads={m.kv_heads}")
    if m.layers % pp:
        problems.append(f"layout: pp={pp} must divide num_layers={m.layers}")

    # ---- sizes of the rollout batch
    responses = tr.prompts_per_step * ro.n_samples
    seq_max = ro.max_prompt_len + ro.max_new_tokens
    resp_mean = opts.mean_response_frac * ro.max_new_tokens
    prompt_mean = opts.mean_prompt_frac * ro.max_prompt_len
    seq_mean = prompt_mean + resp_mean
    tokens_max = responses * seq_max  # every response at max length (memory)
    tokens_mean = responses * seq_mean  # time

    # ---- model state (largest stage)
    p_local = pm.stage_params(m, tp, pp)
    linear_local = m.layers // pp * pm.layer_matmul_params(m) // tp
    fp8_cache = 2 if par.fp8 != "none" else 0  # TE keeps an fp8 copy + transpose of linear weights
    wbytes = 2 if cfg.model.params_dtype in ("bfloat16", "float16") else 4
    state = pm.model_state_bytes(p_local, dp * cp, grad_bytes=opts.grad_bytes,
                                 distributed=par.distributed_optimizer, weight_bytes=wbytes)
    if fp8_cache:
        state["fp8 weights"] = fp8_cache * linear_local

    # ---- host memory: the KL reference copy of every rank's weights, offloaded (algo.kl)
    if cfg.algo.kl.estimator != "none" and cfg.algo.kl.reference_offload:
        host = hw.gpus_per_node * p_local * wbytes
        if host > hw.host_mem_gib * 2**30:
            problems.append(f"host memory: the KL reference copies need {pm.human(host)} per node > "
                            f"host_mem_gib={hw.host_mem_gib:g}; set algo.kl.reference_offload=false or "
                            "raise parallel.tp / pp")

    # ---- per-token batch fields resident on this GPU (ids, logp_old, advantage, λ̄, masks ...)
    local_tokens_max = tokens_max / (dp * cp)
    batch_fields = 24 * local_tokens_max

    # ---- training phase
    t_train = tr.max_tokens_per_gpu_train
    t_lp = tr.max_tokens_per_gpu_logprob
    if seq_max > t_train * cp:
        problems.append(f"train micro-batch: one sequence of {seq_max} tokens needs "
                        f"{pm.ceil_div(seq_max, cp)} tokens per GPU at cp={cp}, but "
                        f"train.max_tokens_per_gpu_train={t_train}; raise it or parallel.cp")
    if seq_max > t_lp * cp:
        problems.append(f"log-prob micro-batch: one sequence of {seq_max} tokens needs "
                        f"{pm.ceil_div(seq_max, cp)} tokens per GPU at cp={cp}, but "
                        f"train.max_tokens_per_gpu_logprob={t_lp}")
    mini_tokens = tokens_max / tr.mini_batches / dp  # tokens per DP replica per optimizer step
    n_micro = max(1, pm.ceil_div(int(mini_tokens), t_train * cp))
    in_flight = min(pp, n_micro)
    recompute = opts.recompute
    act = pm.train_activation_bytes(m, t_train, tp, pp, sp, recompute, in_flight, par.vpp)
    memory = {
        "train": dict(state) | {"activations": act,
                                "lm head+chunks": pm.lm_head_bytes(m, t_train, tr.logprob_chunk_tokens,
                                                                   tp),
                                "batch fields": batch_fields},
    }

    # ---- old-log-prob phase (+ DelTA cache)
    logprob = dict(state) | {"forward work": pm.forward_working_bytes(m, t_lp, tp, sp),
                             "logit chunks": 2 * pm.FP32 * tr.logprob_chunk_tokens * m.vocab / tp,
                             "batch fields": batch_fields}
    delta_on = "delta" in cfg.credit.methods
    dcfg = cfg.credit.delta
    if delta_on and dcfg.mode == "cache":
        resp_local = responses * ro.max_new_tokens / (dp * cp) / (tp if sp else 1)
        cache_bytes = resp_local * m.d * (2 if dcfg.cache_dtype == "bfloat16" else 4)
        logprob["delta v cache"] = cache_bytes
    memory["logprob"] = logprob

    # ---- rollout engine
    usable = (hw.hbm_gib - hw.reserved_gib) * 2**30
    sgl_tp = sg.tp if ro.engine == "sglang" else tp
    rollout_gpus = opts.rollout_nodes * hw.gpus_per_node if opts.rollout_nodes else gpus
    servers = max(1, rollout_gpus // sgl_tp)
    weights_total = 2 * pm.total_params(m)
    kvb = pm.kv_bytes_per_token(m)
    if ro.engine == "sglang":
        pool = sg.mem_fraction * hw.hbm_gib * 2**30  # per GPU: SGLang weights + KV pool
        kv_capacity_tokens = (pool * sgl_tp - weights_total) / kvb
        rollout_mem = {"sglang pool": pool}
        if not opts.rollout_nodes:
            rollout_mem = dict(state) | rollout_mem
        memory["rollout"] = rollout_mem
        if kv_capacity_tokens < seq_max:
            problems.append(
                f"SGLang KV cache: pool {pm.human(pool)}/GPU x tp {sgl_tp} minus weights "
                f"{pm.human(weights_total)} leaves {max(kv_capacity_tokens, 0):.0f} tokens "
                f"({pm.human(kvb)}/token), less than one {seq_max}-token sequence; "
                "raise rollout.sglang.tp or mem_fraction")
    else:  # embedded engine: KV of its generation batch, split over the data-parallel ranks
        batch = pm.ceil_div(min(ro.batch_size, responses), dp)
        memory["rollout"] = dict(state) | {"kv cache": kvb * seq_max * batch / tp}
        kv_capacity_tokens = batch * seq_max
    seqs_per_server = pm.ceil_div(responses, servers)
    concurrency = max(1, min(seqs_per_server, int(kv_capacity_tokens // max(seq_mean, 1)),
                             pm.ceil_div(sg.max_concurrency, servers) if ro.engine == "sglang"
                             else seqs_per_server))

    for phase, parts in memory.items():
        need = sum(parts.values())
        if need > usable:
            big = max(parts, key=parts.get)
            problems.append(
                f"{phase} phase: needs {pm.human(need)} per GPU > usable {pm.human(usable)} "
                f"({hw.hbm_gib:g} GiB {hw.gpu} - {hw.reserved_gib:g} reserved); largest: {big} "
                f"{pm.human(parts[big])}" + _hint(phase, big))

    # ---- step time
    peak = (hw.fp8_tflops if par.fp8 != "none" else hw.bf16_tflops) * 1e12
    hbm = hw.hbm_tbps * 1e12
    n_flops = pm.flops_params(m)
    ctx = prompt_mean + resp_mean / 2
    t_step = pm.decode_step_seconds(weights_total / sgl_tp, concurrency * ctx * kvb / sgl_tp,
                                    2 * n_flops * concurrency / sgl_tp, hbm, hw.decode_mbu,
                                    hw.bf16_tflops * 1e12, hw.forward_mfu)
    t_step1 = pm.decode_step_seconds(weights_total / sgl_tp, ctx * kvb / sgl_tp, 2 * n_flops / sgl_tp,
                                     hbm, hw.decode_mbu, hw.bf16_tflops * 1e12, hw.forward_mfu)
    decode = max(seqs_per_server * resp_mean / concurrency * t_step, ro.max_new_tokens * t_step1)
    prefill = responses * pm.forward_flops(m, int(prompt_mean), max(1, int(prompt_mean))) / (
        rollout_gpus * hw.bf16_tflops * 1e12 * hw.forward_mfu)
    fwd_all = pm.forward_flops(m, int(tokens_mean), max(1, int(seq_mean)))
    t_logprob = fwd_all / (gpus * peak * hw.forward_mfu)
    extra = 0
    if delta_on:
        extra = {"cache": 0, "moments": dcfg.K + 1, "recompute": dcfg.K + 2}[dcfg.mode]
    bubble = 1 + (pp - 1) / (n_micro * (par.vpp or 1)) if pp > 1 else 1.0
    t_train_s = tr.ppo_epochs * pm.train_flops(m, int(tokens_mean), max(1, int(seq_mean)),
                                               recompute) / (gpus * peak * hw.train_mfu) * bubble
    cross_node = gpus > hw.gpus_per_node and dp * cp > 1
    link = (hw.ib_gbps if cross_node else hw.nvlink_gbps) * 1e9
    # distributed optimizer per optimizer step: reduce-scatter the grads + all-gather the weights,
    # i.e. the bandwidth of one all-reduce of (grad + weight bytes)/2 per parameter; not overlapped
    grad_sync = tr.mini_batches * tr.ppo_epochs * pm.ring_allreduce_seconds(
        (opts.grad_bytes + wbytes) / 2 * p_local, dp * cp, link)
    if ro.engine == "sglang" and opts.rollout_nodes:
        sync = weights_total / (hw.ib_gbps * 1e9 * hw.gpus_per_node)
    else:
        sync = weights_total / sgl_tp / (hw.nvlink_gbps * 1e9)
    time_s = {"rollout prefill": prefill, "rollout decode": decode, "old-logprob pass": t_logprob,
              "delta extra fwd": extra * t_logprob, "train fwd+bwd": t_train_s,
              "dp grad sync": grad_sync, "weight sync": sync}
    ckpt = checkpoint_save_seconds(cfg, hw, opts.nodes)
    notes.append(f"checkpoint save (weights + Adam) ~{ckpt:.0f} s at {hw.fs_write_gbps:g} GB/s/node; "
                 "the Slurm preemption signal lead must cover it plus one train phase")
    if delta_on and dcfg.mode != "cache":
        notes.append(f"DelTA mode {dcfg.mode}: {extra} extra forward passes per rollout batch")
    layout = dict(model=f"{cfg.model.arch}-d{m.d}-L{m.layers}", gpu=hw.gpu, nodes=opts.nodes,
                  gpus_per_node=hw.gpus_per_node, rollout_nodes=opts.rollout_nodes, engine=ro.engine,
                  params=pm.total_params(m), stage_params=p_local, tp=tp, pp=pp, cp=cp, dp=dp, sp=sp,
                  recompute=recompute, fp8=par.fp8, responses=responses, seq_max=seq_max,
                  servers=servers, sglang_tp=sgl_tp, concurrency=concurrency, micro_batches=n_micro)
    return Plan(layout, memory, usable, time_s, problems, notes)


def checkpoint_bytes(cfg: Config) -> float:
    """Bytes of one trainer checkpoint: the weights in their dtype plus the fp32 main copy and Adam's
    two moments (12 bytes per parameter) — what ``checkpoint.keep`` multiplies on disk."""
    wbytes = 2 if cfg.model.params_dtype in ("bfloat16", "float16") else 4
    return (wbytes + 12) * pm.total_params(dims(cfg))


def checkpoint_save_seconds(cfg: Config, hw: Hardware, nodes: int) -> float:
    """Time to write one checkpoint at the profile's per-node filesystem bandwidth."""
    return checkpoint_bytes(cfg) / (hw.fs_write_gbps * 1e9 * nodes)


def _hint(phase: str, component: str) -> str:
    hints = {
        "activations": "; try parallel.cp x2, a smaller train.max_tokens_per_gpu_train, or --recompute full",
        "delta v cache": "; try credit.delta.cache_dtype=bfloat16, parallel.sequence_parallel, or "
                         "credit.delta.mode=moments (K+1 extra forwards, no cache)",
        "sglang pool": "; lower rollout.sglang.mem_fraction or give SGLang its own nodes",
        "optimizer": "; more data-parallel ranks (nodes) shard it further",
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
        "(weights, grads, Adam, activations, log-prob chunks, DelTA cache, SGLang pool) at the worst\n"
        "case, and the step time by component, from FLOPs and the cluster profile's bandwidths.",
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
    parser.add_argument("--recompute", choices=["none", "full"], default="none")
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
