"""The planner's cost model: closed-form parameter, memory and FLOP counts (docs/planner.md).

Pure functions of numbers, no torch, so every line can be checked by hand. Conventions: bytes and
FLOPs are plain counts; ``d`` hidden size, ``hq = heads·head_dim``, ``hkv = kv_heads·head_dim``,
``f`` the SwiGLU intermediate size, ``V`` the (TP-padded) vocabulary, ``L`` layers, ``t`` TP, ``p``
PP, ``c`` CP.
"""

from __future__ import annotations

from dataclasses import dataclass

BF16 = 2
FP32 = 4


@dataclass(frozen=True)
class Dims:
    """The shapes a cost depends on (built from ``ModelConfig``)."""

    d: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    tied: bool
    qk_norm: bool
    qkv_bias: bool

    @property
    def hq(self) -> int:
        return self.heads * self.head_dim

    @property
    def hkv(self) -> int:
        return self.kv_heads * self.head_dim


# ----------------------------------------------------------------------------- parameters
def layer_matmul_params(m: Dims) -> int:
    """Weights of one decoder layer that TP shards: q, k, v, o projections and the SwiGLU MLP."""
    attn = m.d * (m.hq + 2 * m.hkv) + m.hq * m.d
    bias = (m.hq + 2 * m.hkv) if m.qkv_bias else 0
    return attn + bias + 3 * m.d * m.ffn


def layer_norm_params(m: Dims) -> int:
    """Replicated (not TP-sharded) weights of one layer: two RMSNorms (+ q/k norms for Qwen3)."""
    return 2 * m.d + (2 * m.head_dim if m.qk_norm else 0)


def total_params(m: Dims) -> int:
    """All parameters: embedding, layers, final norm, and the LM head when it is not tied."""
    per_layer = layer_matmul_params(m) + layer_norm_params(m)
    head = 0 if m.tied else m.vocab * m.d
    return m.vocab * m.d + m.layers * per_layer + m.d + head


def stage_params(m: Dims, tp: int, pp: int) -> int:
    """Parameters held by one GPU of the largest pipeline stage. Each stage has ``L/p`` layers
    (matmuls sharded by TP, norms replicated); the first stage adds the vocab-parallel embedding,
    the last the output layer (a copy of the embedding when tied and p > 1) and the final norm."""
    layers = m.layers // pp * (layer_matmul_params(m) // tp + layer_norm_params(m))
    vocab_rows = m.vocab * m.d // tp
    if pp == 1:
        head = 0 if m.tied else vocab_rows
        return layers + vocab_rows + head + m.d
    return layers + vocab_rows + m.d  # last stage: output layer + final norm (first stage: ≤ this)


def flops_params(m: Dims) -> int:
    """Parameters that do matmul work per token (everything except the embedding lookup and norms):
    the N of the 6·N·tokens rule, including the LM head."""
    return m.layers * layer_matmul_params(m) + m.vocab * m.d


# ----------------------------------------------------------------------------- model state
def model_state_bytes(params: int, dp_cp: int, *, grad_bytes: int = FP32, distributed: bool = True,
                      weight_bytes: int = BF16, fp8_weight_bytes: int = 0) -> dict[str, float]:
    """Weights, main gradients and Adam state (fp32 master + m + v = 12 B/param) for ``params``.
    The distributed optimizer shards the 12 B over the data-parallel(+CP) group, Megatron's
    ``6 + 12/d`` bytes/param for bf16 weights with fp32 grads. fp32 weights are their own master
    copy: 8 B/param of Adam state."""
    opt = (8 + (FP32 if weight_bytes < FP32 else 0)) * params / (dp_cp if distributed else 1)
    return {"weights": weight_bytes * params + fp8_weight_bytes * params,
            "grads": grad_bytes * params, "optimizer": opt}


# ----------------------------------------------------------------------------- activations
def layer_activation_bytes_per_token(m: Dims, tp: int, sp: bool) -> float:
    """Bytes one layer saves for backward per token (bf16, flash attention, no dropout).

    Saved: RMSNorm inputs and the two linear inputs they feed (4·d, sharded by TP only with sequence
    parallelism), q/k before the qk-norm (hq + hkv, Qwen3 only), rotated q, k and v (hq + 2·hkv) and
    the attention output (hq) for flash attention's backward, SwiGLU gate/up outputs (2·f) and its
    product (f); plus flash attention's fp32 log-sum-exp per head. No s² score matrix: flash
    recomputes it (the 5·a·s/h term of Korthikanti et al. vanishes)."""
    seq_shard = tp if sp else 1
    elems = 4 * m.d / seq_shard
    elems += ((m.hq + m.hkv if m.qk_norm else 0) + (m.hq + 2 * m.hkv) + m.hq + 3 * m.ffn) / tp
    return BF16 * elems + FP32 * m.heads / tp


def selective_savings_per_token(m: Dims, tp: int, modules: tuple[str, ...]) -> float:
    """Bytes per token and layer that selective recompute does not keep: ``mlp`` drops the SwiGLU
    gate/up outputs and their product (3·f/t); ``core_attn`` only flash attention's fp32 log-sum-exp
    (flash already recomputes the scores, so it saves almost nothing)."""
    saved = BF16 * 3 * m.ffn / tp if "mlp" in modules else 0.0
    return saved + (FP32 * m.heads / tp if "core_attn" in modules else 0.0)


def train_activation_bytes(m: Dims, tokens: int, tp: int, pp: int, sp: bool, recompute: str,
                           in_flight: int, vpp: int | None = None, *, method: str = "uniform",
                           num_layers: int = 1, modules: tuple[str, ...] = ()) -> float:
    """Activations of the largest stage for ``tokens`` per micro-batch on this GPU.

    ``none``: every layer keeps its activations. ``full`` (megatron-core's methods): ``uniform``
    keeps the input (2·d/[t if SP]) of each group of ``num_layers`` layers and one group's
    activations during its recomputation; ``block`` recomputes the first ``num_layers`` layers of
    the stage (their inputs kept) and keeps everything of the rest. ``selective``: every layer keeps
    its activations less :func:`selective_savings_per_token`. 1F1B keeps ``in_flight`` (≤ p)
    micro-batches alive on the first stage; interleaving adds (p−1)/(p·v) (Korthikanti et al.
    2022, §4.2)."""
    per_layer = layer_activation_bytes_per_token(m, tp, sp) * tokens
    layers = m.layers // pp
    kept = BF16 * m.d / (tp if sp else 1) * tokens  # one layer input
    if recompute == "full" and method == "uniform":
        stage = kept * ceil_div(layers, num_layers) * in_flight + per_layer * num_layers
    elif recompute == "full":  # block
        n = min(num_layers, layers)
        stage = (kept * n + per_layer * (layers - n)) * in_flight + per_layer * (1 if n else 0)
    elif recompute == "selective":
        stage = (per_layer - selective_savings_per_token(m, tp, modules) * tokens) * layers * in_flight
    else:
        stage = per_layer * layers * in_flight
    if vpp and pp > 1:
        stage *= 1 + (pp - 1) / (pp * vpp)
    return stage


def lm_head_bytes(m: Dims, tokens: int, chunk: int, tp: int) -> float:
    """The chunked vocab-parallel log-prob: the LM-head input ``h`` kept for backward (bf16) plus
    the largest temporaries, ``[chunk, V/t]`` fp32 logits and their gradient."""
    return BF16 * m.d * tokens + 2 * FP32 * min(chunk, tokens) * m.vocab / tp


def forward_working_bytes(m: Dims, tokens: int, tp: int, sp: bool) -> float:
    """A no-grad forward holds one layer's intermediates and the residual stream at a time."""
    return layer_activation_bytes_per_token(m, tp, sp) * tokens + BF16 * m.d * tokens


# ----------------------------------------------------------------------------- rollout engine
def kv_bytes_per_token(m: Dims, kv_dtype_bytes: int = BF16) -> int:
    """K and V of every layer: 2 · L · kv_heads · head_dim · bytes."""
    return 2 * m.layers * m.hkv * kv_dtype_bytes


# ----------------------------------------------------------------------------- FLOPs
def attention_flops_fwd(m: Dims, seq_len: int) -> float:
    """Causal self-attention score + value FLOPs of one sequence, forward: QKᵀ and AV are
    2·s²·hq each per layer, halved by the causal mask."""
    return 2 * m.layers * m.hq * seq_len * seq_len


def forward_flops(m: Dims, tokens: int, seq_len: int) -> float:
    """Forward FLOPs for ``tokens`` tokens in sequences of ``seq_len``: 2·N per token + attention."""
    return 2 * flops_params(m) * tokens + attention_flops_fwd(m, seq_len) * tokens / seq_len


def train_flops(m: Dims, tokens: int, seq_len: int, recompute: str, recomputed_frac: float = 1.0) -> float:
    """Forward + backward = 3× forward (6·N·tokens + attention); recompute adds the forward of what
    it recomputes, ``recomputed_frac`` of the forward (full uniform: 1; block: n/L; selective: the
    MLPs' share)."""
    extra = recomputed_frac if recompute in ("full", "selective") else 0.0
    return forward_flops(m, tokens, seq_len) * (3 + extra)


def decode_step_seconds(weight_bytes: float, kv_read_bytes: float, flops: float, hbm_bps: float,
                        mbu: float, peak_flops: float, mfu: float) -> float:
    """One decode step of a server: memory-bound on reading weights + the batch's KV cache, or
    compute-bound on its FLOPs, whichever is slower."""
    return max((weight_bytes + kv_read_bytes) / (hbm_bps * mbu), flops / (peak_flops * mfu))


def ring_allreduce_seconds(nbytes: float, group: int, link_bps: float) -> float:
    """Bandwidth term of a ring all-reduce (reduce-scatter + all-gather): 2·(g−1)/g · bytes / bw."""
    return 0.0 if group <= 1 else 2 * (group - 1) / group * nbytes / link_bps


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def gib(nbytes: float) -> float:
    return nbytes / 2**30


def human(nbytes: float) -> str:
    """Bytes in the largest binary unit that keeps a leading digit: ``1023.5 KiB``, ``40.0 GiB``."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes:.0f} B"
