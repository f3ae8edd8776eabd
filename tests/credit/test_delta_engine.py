"""DeltaEngine (accumulate -> reduce -> finish) against the literal reference, single process."""

from __future__ import annotations

import pytest
import torch

from delta_megatron.credit.delta import DeltaConfig, DeltaEngine, DeltaState
from delta_megatron.credit.delta_stats import (
    FlatStats,
    gamma_from_moments,
    kth_largest,
    side_gamma,
)
from delta_megatron.utils.configs import ConfigError
from tests.credit.test_delta import random_batch
from tests.oracles.delta_reference import delta_reference

F64 = torch.float64
MODES = ["cache", "moments", "recompute"]
ABLATIONS = {
    "default": {},
    "within_side_only": {"within_side_only": True},
    "frozen_gamma": {"frozen_gamma": True},
    "hard_assignment": {"hard_assignment": True},
    "no_lambda_norm": {"lambda_norm": False},
    "no_range_map": {"range_map": False},
    "random_lambda": {"random_lambda": True},
    "top50": {"selection": "top50"},
    "bottom50": {"selection": "bottom50"},
    "random50": {"selection": "random50"},
    "lambda_range": {"lambda_range": (0.5, 1.5)},
}
RANDOM_DRAWS = ("random_lambda", "random50")  # drawn in observation order: compare unchunked


def run_engine(cfg: DeltaConfig, v, a, mask, bounds, *, seed=0, group=None, state=None, h_logp=False):
    """Feed chunks ``bounds`` = [(start, stop), ...] through every data pass; return the values."""
    engine = DeltaEngine(cfg, v.shape[1], group, seed=seed, state=state)
    planned = engine.num_data_passes
    for p in engine.data_passes():
        for key, (lo, hi) in enumerate(bounds):
            if h_logp:  # (1 - p) h with p = 1/2
                engine.observe(p, key, h=2 * v[lo:hi], logp=torch.full((hi - lo,), -0.6931471805599453,
                                                                     dtype=v.dtype),
                               adv=a[lo:hi], mask=mask[lo:hi])
            else:
                engine.observe(p, key, v=v[lo:hi], adv=a[lo:hi], mask=mask[lo:hi])
        engine.end_pass(p)
    assert engine.metrics["delta/data_passes"] == planned
    return torch.cat([engine.values(k) for k in range(len(bounds))]), engine


def random_bounds(n: int, pieces: int, seed: int) -> list[tuple[int, int]]:
    cuts = sorted(torch.randperm(n - 1, generator=torch.Generator().manual_seed(seed))[: pieces - 1] + 1)
    edges = [0, *[int(c) for c in cuts], n]
    return list(zip(edges[:-1], edges[1:]))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(ABLATIONS))
def test_engine_equals_reference(mode, name):
    """Every mode × K ∈ 0..3 × ablation: the engine over micro-batch chunks equals §6.1 (1e-6)."""
    if mode == "moments" and name == "within_side_only":  # no closed-form γ^(0): rejected
        with pytest.raises(ConfigError, match="credit.delta.mode"):
            DeltaEngine(DeltaConfig(mode=mode, within_side_only=True), 4)
        return
    v, a, mask, _ = random_batch(11, responses=30)
    for K in range(4):
        cfg = DeltaConfig(K=K, mode=mode, **ABLATIONS[name])
        bounds = [(0, len(a))] if name in RANDOM_DRAWS else random_bounds(len(a), 5, seed=K)
        got, _ = run_engine(cfg, v, a, mask, bounds, seed=7, h_logp=(K == 1))
        ref = delta_reference(v, a, mask, cfg, seed=7)
        assert got.dtype == ref.dtype
        torch.testing.assert_close(got.double(), ref.double(), atol=1e-6, rtol=0)


def test_pass_counts_and_extra_forwards():
    """Data passes include the old-log-prob pass: cache 1, moments K+2, recompute K+3; extra forwards
    0 / K+1 / K+2 (§7.3, §9.3). γ is not measured when frozen or unused."""
    for K in range(4):
        for mode, passes, extra in (("cache", 1, 0), ("moments", K + 2, K + 1), ("recompute", K + 3, K + 2)):
            engine = DeltaEngine(DeltaConfig(K=K, mode=mode), 4)
            assert engine.num_data_passes == passes
            v, a, mask, _ = random_batch(12, d=4)
            _, engine = run_engine(DeltaConfig(K=K, mode=mode), v, a, mask, [(0, len(a))])
            assert engine.metrics["delta/extra_forwards"] == extra
        assert DeltaEngine(DeltaConfig(K=K, mode="recompute", hard_assignment=True), 4).num_data_passes == K + 2
        frozen = DeltaState(frozen_gamma=(1.0, 2.0))  # A3 after the first batch: no γ^(0) pass/moments
        assert DeltaEngine(DeltaConfig(K=K, mode="recompute", frozen_gamma=True), 4,
                           state=frozen).num_data_passes == K + 2
        engine = DeltaEngine(DeltaConfig(K=K, mode="moments", frozen_gamma=True), 4, state=frozen)
        assert engine.num_data_passes == K + 2 and "Q" not in engine._stats_for("collect").shapes
    assert DeltaEngine(DeltaConfig(mode="recompute", random_lambda=True), 4).num_data_passes == 1


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_micro_batch_split_invariance(dtype):
    """Any split of the tokens into chunks gives the same λ̄ (fp64 to 1e-12, fp32 to 1e-6)."""
    v, a, mask, _ = random_batch(13, responses=40, d=16, dtype=dtype)
    tol = 1e-12 if dtype == F64 else 1e-6
    for mode in MODES:
        cfg = DeltaConfig(mode=mode, K=2)
        whole, _ = run_engine(cfg, v, a, mask, [(0, len(a))])
        assert whole.dtype == dtype
        for seed, pieces in ((0, 2), (1, 7), (2, 31)):
            split, _ = run_engine(cfg, v, a, mask, random_bounds(len(a), pieces, seed))
            torch.testing.assert_close(split, whole, atol=tol, rtol=0)


def test_fp32_engine_close_to_fp64_reference():
    v, a, mask, _ = random_batch(14, responses=40, d=32)
    for mode in MODES:
        got, _ = run_engine(DeltaConfig(mode=mode), v.float(), a.float(), mask, random_bounds(len(a), 4, 0))
        ref = delta_reference(v, a, mask, DeltaConfig())
        torch.testing.assert_close(got.double(), ref, atol=2e-6, rtol=0)


def test_bf16_cache_equals_reference_on_rounded_proxies():
    """cache_dtype bfloat16 keeps v in bf16; every pass (pass 0 included) sees the rounded v."""
    v, a, mask, _ = random_batch(15, d=8, dtype=torch.float32)
    cfg = DeltaConfig(cache_dtype="bfloat16", K=2)
    got, _ = run_engine(cfg, v, a, mask, random_bounds(len(a), 3, 0))
    ref = delta_reference(v.bfloat16().float(), a, mask, cfg)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
    exact = delta_reference(v, a, mask, cfg)
    assert (got - exact).abs().max() > 1e-6  # the rounding is visible, so the test above can fail


def test_moments_gamma_equals_margin_pass_gamma():
    """§9.3: 4 DᵀCov D from per-side moments equals the std of the margins at μ^(0)."""
    v, a, mask, _ = random_batch(16, responses=40, d=12)
    _, rec = run_engine(DeltaConfig(mode="recompute"), v, a, mask, [(0, len(a))])
    _, mom = run_engine(DeltaConfig(mode="moments"), v, a, mask, [(0, 17), (17, len(a))])
    for side in ("pos", "neg"):
        assert mom.metrics[f"delta/gamma0_{side}"] == pytest.approx(rec.metrics[f"delta/gamma0_{side}"],
                                                                    rel=1e-10)
    details: dict = {}
    delta_reference(v, a, mask, DeltaConfig(), details=details)
    assert rec.metrics["delta/gamma0_pos"] == pytest.approx(float(details["gamma0"][0]), rel=1e-12)


def test_engine_metrics_match_reference_quantities():
    v, a, mask, _ = random_batch(17, responses=30)
    got, engine = run_engine(DeltaConfig(K=1), v, a, mask, random_bounds(len(a), 4, 1))
    details: dict = {}
    ref = delta_reference(v, a, mask, DeltaConfig(K=1), details=details)
    m = engine.metrics
    assert m["delta/gamma_pos"] == pytest.approx(float(details["gamma"][0]), rel=1e-12)
    assert m["delta/lambda_bar_std"] == pytest.approx(float(ref[mask].std(unbiased=False)), rel=1e-9)
    assert m["delta/lambda_bar_min"] == pytest.approx(float(ref[mask].min()), rel=1e-12)
    sided = a[mask] != 0
    assert m["delta/n_pos"] + m["delta/n_neg"] == int(sided.sum())
    torch.testing.assert_close(engine.mu[0], details["mu_pos"])


def test_engine_rejects_misuse():
    v, a, mask, _ = random_batch(18, d=4)
    engine = DeltaEngine(DeltaConfig(mode="recompute"), 4)
    with pytest.raises(ValueError, match="current data pass is 0"):
        engine.observe(1, "a", v=v, adv=a, mask=mask)
    with pytest.raises(ValueError, match=r"expected \[n, 4\]"):
        engine.observe(0, "a", v=v[:, :3], adv=a, mask=mask)
    with pytest.raises(ValueError, match="must be"):
        engine.observe(0, "a", v=v, adv=a[:-1], mask=mask)
    with pytest.raises(ValueError, match="give h and logp, or v"):
        engine.observe(0, "a", h=v, adv=a, mask=mask)
    engine.observe(0, "a", v=v[:10], adv=a[:10], mask=mask[:10])
    engine.observe(0, "b", v=v[10:], adv=a[10:], mask=mask[10:])
    with pytest.raises(ValueError, match="twice in pass 0"):
        engine.observe(0, "a", v=v[:10], adv=a[:10], mask=mask[:10])
    with pytest.raises(RuntimeError, match="after the last end_pass"):
        engine.lambda_bar("a")
    engine.end_pass(0)
    with pytest.raises(KeyError, match="not observed in pass 0"):
        engine.observe(1, "c", v=v[:10], adv=a[:10], mask=mask[:10])
    with pytest.raises(ValueError, match="has 9 tokens in pass 1"):
        engine.observe(1, "a", v=v[:9], adv=a[:9], mask=mask[:9])
    engine.observe(1, "a", v=v[:10], adv=a[:10], mask=mask[:10])
    with pytest.raises(ValueError, match=r"\['b'\] not observed"):
        engine.end_pass(1)
    with pytest.raises(RuntimeError, match="call end_pass"):
        passes = DeltaEngine(DeltaConfig(), 4).data_passes()
        next(passes)
        next(passes)


# ----------------------------------------------------------------------- statistics helpers

def test_flat_stats_layout():
    st = FlatStats({"S": (2, 3), "M": (2,), "Q": (2, 3, 3)})
    assert st.buffer.numel() == 6 + 2 + 18
    st.add("S", torch.arange(6.0).view(2, 3))
    st.add("M", torch.tensor([1.0, 2.0]))
    st.add("Q", torch.ones(2, 3, 3))
    assert st.buffer[:8].tolist() == [0, 1, 2, 3, 4, 5, 1, 2] and st.buffer[8:].sum() == 18
    st.reduce(None)
    with pytest.raises(RuntimeError, match="after the reduction"):
        st.add("M", 1.0)


def test_gamma_estimators_brute_force():
    gen = torch.Generator().manual_seed(3)
    x_pos, x_neg = torch.randn(40, generator=gen, dtype=F64) + 100, torch.randn(25, generator=gen, dtype=F64)
    g = side_gamma(torch.stack([x_pos.sum(), x_neg.sum()]), torch.stack([(x_pos**2).sum(), (x_neg**2).sum()]),
                   torch.tensor([40.0, 25.0], dtype=F64), 1e-8)
    torch.testing.assert_close(g, torch.stack([x_pos.std(unbiased=False), x_neg.std(unbiased=False)]))
    v = torch.randn(30, 5, generator=gen, dtype=F64)
    D = torch.randn(5, generator=gen, dtype=F64)
    side = torch.tensor([True] * 18 + [False] * 12)
    sv = torch.stack([v[side].sum(0), v[~side].sum(0)])
    svv = torch.stack([v[side].T @ v[side], v[~side].T @ v[~side]])
    got = gamma_from_moments(D, sv, svv, torch.tensor([18.0, 12.0], dtype=F64), 1e-8)
    m = 2 * v @ D + 0.37  # the constant c drops out
    torch.testing.assert_close(got, torch.stack([m[side].std(unbiased=False), m[~side].std(unbiased=False)]))


def test_kth_largest_brute_force():
    gen = torch.Generator().manual_seed(4)
    vals = torch.cat([torch.rand(50, generator=gen, dtype=F64), torch.full((7,), 0.8, dtype=F64),
                      torch.zeros(3, dtype=F64)])
    pieces = [vals[:10], vals[10:10], vals[10:45].float().double(), vals[45:]]  # one fp32-rounded piece
    ordered = torch.cat(pieces).sort(descending=True).values
    for k in (1, 2, 29, 30, 31, 57, 60):
        assert kth_largest(pieces, k, None) == ordered[k - 1].item()
    with pytest.raises(ValueError, match="outside"):
        kth_largest(pieces, 61, None)
    with pytest.raises(ValueError, match="non-negative"):
        kth_largest([-vals], 1, None)


def test_random_controls_are_layout_invariant_with_token_ids():
    """random_lambda and random50 draw from a hash of the token id: any chunking, any observation order
    and any (rank) seed give the same coefficients; the draws are uniform."""
    from delta_megatron.credit.delta import DeltaConfig, DeltaEngine
    from delta_megatron.credit.delta_stats import hash_uniform

    g = torch.Generator().manual_seed(5)
    n, d = 200, 6
    v = torch.randn(n, d, generator=g, dtype=torch.float64)
    adv = torch.randn(40, generator=g, dtype=torch.float64).repeat_interleave(5)
    mask = torch.rand(n, generator=g) > 0.1
    ids = torch.arange(n) + 10_000
    for cfg in (DeltaConfig(random_lambda=True), DeltaConfig(selection="random50")):
        results = []
        for order, seed in (([slice(0, n)], 0), ([slice(150, n), slice(0, 70), slice(70, 150)], 99)):
            eng = DeltaEngine(cfg, d, seed=seed, hash_seed=7)
            for p in eng.data_passes():
                for i, sl in enumerate(order):
                    eng.observe(p, i, adv=adv[sl], mask=mask[sl], v=v[sl], token_ids=ids[sl])
                eng.end_pass(p)
            out = torch.zeros(n, dtype=torch.float64)
            for i, sl in enumerate(order):
                out[sl] = eng.values(i).double()
            results.append(out)
        assert torch.equal(results[0], results[1])
    u = hash_uniform(torch.arange(100_000), 3)
    assert 0 <= float(u.min()) and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.01
    assert not torch.equal(hash_uniform(torch.arange(10), 3), hash_uniform(torch.arange(10), 4))


@pytest.mark.parametrize("cache_dtype", ["float32", "bfloat16"])
def test_host_cache_gives_the_same_lambda_as_the_device_cache(cache_dtype, monkeypatch):
    """credit.delta.cache_device: the v cache in host memory replays exactly the values kept on the
    device (bit-identical λ̄); host mode stores a copy of each chunk, device mode the chunk itself."""
    from delta_megatron.credit.delta_cache import VCache

    stored: list[tuple[bool, int, int]] = []  # (host, input storage, kept storage)
    inner = VCache.store

    def spy(self, v):
        out = inner(self, v)
        stored.append((self.host, v.untyped_storage().data_ptr(), out.untyped_storage().data_ptr()))
        return out

    monkeypatch.setattr(VCache, "store", spy)
    v, a, mask, _ = random_batch(16, responses=30, d=8, dtype=torch.float32)
    bounds = random_bounds(len(a), 4, 0)
    want, device_engine = run_engine(DeltaConfig(K=2, cache_dtype=cache_dtype, cache_device="gpu"),
                                     v, a, mask, bounds)
    got, host_engine = run_engine(DeltaConfig(K=2, cache_dtype=cache_dtype, cache_device="host"),
                                  v, a, mask, bounds)
    assert torch.equal(got, want) and got.std() > 0.01
    assert [s[0] for s in stored] == [False] * len(bounds) + [True] * len(bounds)
    assert all((src == kept) != host for host, src, kept in stored)
    for key in range(len(bounds)):
        kept = host_engine._chunks[key].v
        assert kept.device.type == "cpu" and kept.dtype == getattr(torch, cache_dtype)
        assert torch.equal(kept, device_engine._chunks[key].v)
    with pytest.raises(ConfigError, match="cache_device: 'disk' — allowed: 'auto', 'gpu', 'host'"):
        DeltaEngine(DeltaConfig(cache_device="disk"), 4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_host_cache_on_gpu_is_pinned_and_equal():
    """GPU path: v copied to pinned host memory on a side stream during pass 0, streamed back with a
    prefetch for the replay; λ̄ equals the on-device cache bit for bit."""
    v, a, mask, _ = random_batch(17, responses=60, d=64, dtype=torch.float32)
    v, a, mask = v.cuda(), a.cuda(), mask.cuda()
    bounds = random_bounds(len(a), 6, 0)
    want, _ = run_engine(DeltaConfig(K=2, cache_device="gpu"), v, a, mask, bounds)
    got, engine = run_engine(DeltaConfig(K=2, cache_device="host"), v, a, mask, bounds)
    assert got.is_cuda and torch.equal(got, want)
    assert all(c.v.device.type == "cpu" and c.v.is_pinned() for c in engine._chunks.values())
