"""GPU-only checks (skipped without CUDA / Transformer Engine): the chunked log-prob kernel on CUDA
in bf16, TE layer spec == local spec within bf16 tolerance, CP=2 attention == unsharded."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from delta_megatron.ops.logprob import chunked_logprob_from_hidden
from tests.dist.mg_common import hf_logits, make_hf_dir, sample_sequences, torchrun

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
needs_te = pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is None
                              or not torch.cuda.is_available(), reason="needs transformer-engine")


@pytest.mark.gpu
@needs_cuda
def test_chunked_logprob_on_cuda_bf16():
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(4096, 256, generator=gen).bfloat16().cuda()
    w = (0.05 * torch.randn(32768, 256, generator=gen)).bfloat16().cuda()
    y = torch.randint(0, 32768, (4096,), generator=gen).cuda()
    out = chunked_logprob_from_hidden(h, w, y, None, 512)
    lsm = torch.log_softmax((h @ w.t()).float(), dim=-1)
    torch.testing.assert_close(out.logp, lsm.gather(1, y[:, None])[:, 0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.entropy, -(lsm.exp() * lsm).sum(-1), atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.te
@pytest.mark.dist
@needs_te
def test_te_spec_forward_matches_local_spec(tmp_path):
    model = make_hf_dir("qwen3_tied", tmp_path)
    torchrun("mg_gpu_te.py", 1, ["--mode", "spec", "--model", str(model)], gpu=True)


@pytest.mark.gpu
@pytest.mark.te
@pytest.mark.dist
@needs_te
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_cp2_attention_matches_unsharded(tmp_path):
    model = make_hf_dir("llama_untied", tmp_path)
    ref = tmp_path / "ref.pt"
    torch.save(hf_logits(model, sample_sequences()), ref)
    torchrun("mg_gpu_te.py", 2, ["--mode", "cp", "--model", str(model), "--ref", str(ref)], gpu=True)


@pytest.mark.gpu
@needs_cuda
def test_deterministic_kernels_on_cuda(monkeypatch):
    """``train.deterministic`` on CUDA: TE attention without non-deterministic algorithms, a fixed cuBLAS
    workspace, torch's deterministic algorithms; then the same matmul+scatter twice gives equal bits."""
    from delta_megatron.models.gpt import use_deterministic_kernels

    for var in ("NVTE_ALLOW_NONDETERMINISTIC_ALGO", "CUBLAS_WORKSPACE_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    was = torch.are_deterministic_algorithms_enabled()
    try:
        use_deterministic_kernels()
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        import os

        assert os.environ["NVTE_ALLOW_NONDETERMINISTIC_ALGO"] == "0"
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        gen = torch.Generator().manual_seed(0)
        src = torch.randn(100_000, 64, generator=gen).cuda()
        idx = torch.randint(0, 16, (100_000,), generator=gen).cuda()
        runs = [torch.zeros(16, 64, device="cuda").index_add_(0, idx, src @ src[:64].T) for _ in range(2)]
        assert torch.equal(runs[0], runs[1])
    finally:
        torch.use_deterministic_algorithms(was)
