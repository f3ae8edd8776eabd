"""Tiny-model helpers for rollout tests: a random Qwen3 from a config, and slow references."""

from __future__ import annotations

import torch

PAD, EOS, VOCAB = 0, 1, 48


def tiny_model(seed: int = 0) -> torch.nn.Module:
    """A 2-layer Qwen3 (tied embeddings) with a wide init so logits are well separated (greedy
    continuations do not hinge on 1e-7 ties between the KV-cache and full-forward paths)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                      tie_word_embeddings=True, max_position_embeddings=256, initializer_range=0.3,
                      pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(cfg)
    return model.float().eval()


def greedy_reference(model, prompt: list[int], max_new: int, stop: set[int]) -> list[int]:
    """Greedy decoding with a full forward per step (no KV cache, no padding)."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(max_new):
            nxt = int(model(torch.tensor([seq])).logits[0, -1].argmax())
            seq.append(nxt)
            if nxt in stop:
                break
    return seq[len(prompt):]


def recompute_logprobs(model, prompt: list[int], response: list[int], temperature: float):
    """log_softmax(logits / T)[y_t] of each response token from one full forward."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0].float()
    t = temperature if temperature > 0 else 1.0
    lp = torch.log_softmax(logits[len(prompt) - 1:-1] / t, dim=-1)
    return lp.gather(1, torch.tensor(response)[:, None]).squeeze(1)
