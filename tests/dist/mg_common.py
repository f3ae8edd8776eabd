"""Shared by the models/ops tests and their torchrun workers: tiny configs, HF model dirs, launcher.

Importable both as ``tests.dist.mg_common`` (pytest) and ``mg_common`` (workers run from tests/dist).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]

# Tiny families: GQA (4 heads / 2 groups), head_dim 8; vocab 64 splits over TP=2.
TINY = {
    "qwen3_tied": dict(arch="qwen3", tie_word_embeddings=True),
    "llama_untied": dict(arch="llama", tie_word_embeddings=False),
    "qwen2_untied": dict(arch="qwen2", tie_word_embeddings=False),
}


def tiny_config(name: str, **overrides):
    from delta_megatron.config import ModelConfig

    kwargs = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, rope_theta=1000.0,
                  max_position_embeddings=256, init_std=0.1, params_dtype="float32")
    kwargs.update(TINY[name])
    kwargs.update(overrides)
    return ModelConfig(**kwargs)


def make_hf_dir(name: str, root: Path, seed: int = 0) -> Path:
    """Save a tiny random HF model whose norms and biases are perturbed too (ones/zeros would hide
    layout mistakes such as swapped q/k norms)."""
    from delta_megatron.models.hf_config import build_hf_model

    cfg = tiny_config(name)
    model = build_hf_model(cfg, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
            elif pname.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    out = root / name
    model.save_pretrained(str(out))
    return out


def make_tokenizer_dir(root: Path, vocab: int = 64) -> Path:
    """A word-level tokenizer over ``vocab`` ids saved the transformers way (no model hub here)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(vocab - 2)} | {"<unk>": vocab - 2, "<eos>": vocab - 1}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
    out = root / "tokenizer"
    fast.save_pretrained(str(out))
    return out


def sample_sequences(seed: int = 0, lengths=(7, 12, 3, 9), vocab: int = 64) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen) for n in lengths]


def coeffs(i: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic per-token loss weights (logp, entropy) for sequence i of the gradient tests."""
    t = torch.arange(n, dtype=torch.float32)
    return 1.0 + 0.1 * ((7 * i + 3 * t) % 5), 0.5 - 0.1 * ((i + t) % 3)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_block(count: int) -> int:
    """A base port whose ``count`` consecutive ports are free, below Linux's ephemeral range (32768+),
    so no outgoing connection can take one of them between this check and the servers' bind."""
    import random

    rng = random.Random()  # not the global generator: tests must not change what a run draws
    for _ in range(200):
        base = rng.randrange(20000, 32768 - count)
        try:
            for port in range(base, base + count):
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError(f"no block of {count} free ports in 20000-32767")


def torchrun(script: str, nproc: int, args: list[str], timeout: float = 240,
             gpu: bool = False) -> str:
    """Run ``tests/dist/<script>`` under torchrun (gloo on CPU unless ``gpu``); fail with its
    output on error."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    if not gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-port", str(free_port()), str(REPO / "tests" / "dist" / script), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{script} (nproc={nproc}) failed:\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-8000:]}")
    return proc.stdout


def hf_logits(model_dir: Path, seqs) -> list[torch.Tensor]:
    """Unsharded reference: each sequence run alone through transformers, fp32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(s.unsqueeze(0)).logits[0] for s in seqs]
