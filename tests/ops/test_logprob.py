"""Chunked vocab-parallel log-prob / entropy / top-K == torch.log_softmax reference (single process;
the TP-group versions are checked in tests/dist/mg_model_layouts.py --ops), gradients == autograd
of the unsharded reference, and the no-grad path's peak memory is bounded by the chunk size."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from delta_megatron.ops.logprob import chunked_logprob_from_hidden, vocab_parallel_logprobs

REPO = Path(__file__).resolve().parents[2]


def _reference(logits: torch.Tensor, targets: torch.Tensor, temperature: float, vocab: int):
    lsm = torch.log_softmax(logits[..., :vocab] / temperature, dim=-1)
    logp = lsm.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    logp = torch.where(targets >= 0, logp, torch.zeros_like(logp))
    return logp, -(lsm.exp() * lsm).sum(-1), torch.logsumexp(logits[..., :vocab] / temperature, -1)


def _data(dtype, tokens=(3, 13), d=16, padded=50, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(*tokens, d, generator=gen, dtype=dtype)
    w = 0.25 * torch.randn(padded, d, generator=gen, dtype=dtype)  # logits of O(1-5), as in LMs
    y = torch.randint(0, 47, tokens, generator=gen)
    y[0, 2] = y[2, 5] = -1  # no target
    return h, w, y


CASES = [(torch.float64, 1e-10), (torch.float32, 1e-6)]


@pytest.mark.parametrize("dtype,tol", CASES)
@pytest.mark.parametrize("chunk", [1, 5, 64])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_values_match_log_softmax(dtype, tol, chunk, temperature):
    h, w, y = _data(dtype)
    vocab = 47  # the last 3 rows of w are TP padding and must not count
    logits = h @ w.t()  # [3, 13, 50]
    ref_logp, ref_ent, ref_lse = _reference(logits, y, temperature, vocab)
    for out in (
        vocab_parallel_logprobs(logits, y, temperature=temperature, chunk_tokens=chunk, top_k=4,
                                vocab_size=vocab),
        chunked_logprob_from_hidden(h, w, y, None, chunk, temperature=temperature, top_k=4,
                                    vocab_size=vocab),
    ):
        assert out.logp.shape == y.shape and out.topk_ids.shape == (*y.shape, 4)
        torch.testing.assert_close(out.logp, ref_logp, atol=tol, rtol=0)
        torch.testing.assert_close(out.entropy, ref_ent, atol=tol, rtol=0)
        torch.testing.assert_close(out.lse, ref_lse, atol=tol, rtol=0)
        top_vals, top_ids = torch.topk(logits[..., :vocab] / temperature, 4, dim=-1)
        assert torch.equal(out.topk_ids, top_ids)
        torch.testing.assert_close(out.topk_logits, top_vals, atol=tol, rtol=0)
        assert torch.all(out.logp[y < 0] == 0)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("terms", ["logp", "entropy", "both"])
def test_gradients_match_autograd_reference(dtype, tol, terms):
    h, w, y = _data(dtype, seed=1)
    vocab, temperature = 47, 0.9
    gen = torch.Generator().manual_seed(2)
    g_lp = torch.randn(y.shape, generator=gen, dtype=dtype)
    g_en = torch.randn(y.shape, generator=gen, dtype=dtype)

    def objective(logp, ent):
        return {"logp": (logp * g_lp).sum(), "entropy": (ent * g_en).sum(),
                "both": (logp * g_lp + ent * g_en).sum()}[terms]

    h_ref, w_ref = h.clone().requires_grad_(), w.clone().requires_grad_()
    objective(*_reference(h_ref @ w_ref.t(), y, temperature, vocab)[:2]).backward()

    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    out = chunked_logprob_from_hidden(h1, w1, y, None, 4, temperature=temperature, vocab_size=vocab)
    objective(out.logp, out.entropy).backward()
    torch.testing.assert_close(h1.grad, h_ref.grad, atol=tol, rtol=0)
    torch.testing.assert_close(w1.grad, w_ref.grad, atol=tol, rtol=0)
    assert torch.all(w1.grad[vocab:] == 0)  # padding rows get no gradient

    logits = (h @ w.t()).requires_grad_()
    ref_logits = logits.detach().clone().requires_grad_()
    objective(*_reference(ref_logits, y, temperature, vocab)[:2]).backward()
    out = vocab_parallel_logprobs(logits, y, temperature=temperature, chunk_tokens=6,
                                  vocab_size=vocab)
    objective(out.logp, out.entropy).backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad, atol=tol, rtol=0)


def test_bf16_hidden_is_computed_in_fp32():
    """bf16 h/W (GPU training dtype): statistics are fp32 over bf16 logits, like megatron's CE."""
    h, w, y = _data(torch.float32)
    hb, wb = h.bfloat16(), w.bfloat16()
    out = chunked_logprob_from_hidden(hb, wb, y, None, 7, vocab_size=47)
    ref_logp, ref_ent, _ = _reference((hb @ wb.t()).float(), y, 1.0, 47)
    assert out.logp.dtype == torch.float32
    torch.testing.assert_close(out.logp, ref_logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.entropy, ref_ent, atol=1e-5, rtol=0)


_MEMORY_SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    from delta_megatron.ops.logprob import chunked_logprob_from_hidden
    T, V, d, chunk = 65536, 151936, 8, int(sys.argv[1])
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(T, d, generator=gen)
    w = 0.1 * torch.randn(V, d, generator=gen)
    y = torch.randint(0, V, (T,), generator=gen)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    with torch.no_grad():
        out = chunked_logprob_from_hidden(h, w, y, None, chunk)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert torch.isfinite(out.logp).all() and torch.isfinite(out.entropy).all()
    print((peak - base) * 1024)
""")


@pytest.mark.slow
def test_no_grad_peak_memory_is_bounded_by_chunk():
    """64k tokens x V=151936: full logits would be 39.8 GB; the chunked pass may use at most
    three [chunk, V] fp32 buffers (it needs two: logits and exp) plus O(tokens) outputs."""
    chunk, tokens, vocab = 128, 65536, 151936
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(chunk)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    extra = int(proc.stdout.strip().splitlines()[-1])
    bound = 3 * chunk * vocab * 4 + 64 * tokens + (16 << 20)
    assert extra < bound, f"peak grew by {extra / 2**20:.0f} MiB > bound {bound / 2**20:.0f} MiB"


def test_top_k_beyond_the_real_columns_pads_with_minus_inf_and_id_minus_one():
    """A vocab shard with fewer real columns than K (TP padding, or a tiny vocab) contributes what it
    has; the rest of its candidates are (−inf, −1), so the TP merge never picks a padding column."""
    gen = torch.Generator().manual_seed(5)
    h, w = torch.randn(6, 4, generator=gen), torch.randn(8, 4, generator=gen)  # 8 rows, 3 real
    y = torch.randint(0, 3, (6,), generator=gen)
    out = chunked_logprob_from_hidden(h, w, y, None, 4, top_k=5, vocab_size=3)
    real_vals, real_ids = torch.topk(h @ w[:3].t(), 3, dim=-1)
    assert torch.equal(out.topk_ids[:, :3], real_ids) and (out.topk_ids[:, 3:] == -1).all()
    torch.testing.assert_close(out.topk_logits[:, :3], real_vals, atol=1e-6, rtol=0)
    assert torch.isneginf(out.topk_logits[:, 3:]).all()
