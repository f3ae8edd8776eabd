"""Converter layouts without megatron: split/merge round trips are bit-exact and the shards have
megatron's documented layouts (interleaved GQA qkv, [gate_r; up_r] fc1, padded vocab). The
end-to-end checks with real GPTModels under TP/PP are in test_layouts.py."""

from __future__ import annotations

import pytest
import torch

from delta_megatron.config import ModelConfig
from delta_megatron.models.converter import _LAYER_MAP, HFSource, merge_shards, split_for_rank

CFG = ModelConfig(arch="qwen3", vocab_size=5, hidden_size=8, intermediate_size=6, num_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=3)


def _full(kind: str, gen: torch.Generator) -> list[torch.Tensor]:
    d, hd = CFG.hidden_size, CFG.kv_channels
    shapes = {"rep": [(d,)], "row": [(d, 4 * hd)], "vocab": [(CFG.vocab_size, d)],
              "gated": [(6, d), (6, d)], "qkv": [(4 * hd, d), (2 * hd, d), (2 * hd, d)],
              "qkv_bias": [(4 * hd,), (2 * hd,), (2 * hd,)]}[kind]
    return [torch.randn(s, generator=gen) for s in shapes]


@pytest.mark.parametrize("kind", ["rep", "row", "vocab", "gated", "qkv", "qkv_bias"])
@pytest.mark.parametrize("tp", [1, 2])
def test_split_then_merge_is_bit_exact(kind, tp):
    full = _full(kind, torch.Generator().manual_seed(0))
    k = "qkv" if kind == "qkv_bias" else kind
    padded = 6 if kind == "vocab" else None  # vocab 5 padded to a multiple of TP=2
    shards = [split_for_rank(k, full, CFG, r, tp, padded_rows=padded) for r in range(tp)]
    if kind == "vocab" and tp == 2:
        assert shards[1].shape[0] == 3 and torch.all(shards[1][2] == 0)  # zero padding row
    merged = merge_shards(k, shards, CFG)
    assert len(merged) == len(full)
    for a, b in zip(merged, full):
        assert torch.equal(a, b)


def test_qkv_shards_follow_megatron_interleaved_gqa_layout():
    # label rows: q head h -> 100+h, k group g -> 200+g, v group g -> 300+g (head_dim 3, d = 1)
    hd = CFG.kv_channels
    q = torch.tensor([100.0 + h for h in range(4) for _ in range(hd)])[:, None]
    k = torch.tensor([200.0 + g for g in range(2) for _ in range(hd)])[:, None]
    v = torch.tensor([300.0 + g for g in range(2) for _ in range(hd)])[:, None]
    rank_rows = [split_for_rank("qkv", [q, k, v], CFG, r, 2)[::hd, 0].tolist() for r in range(2)]
    # each TP rank owns one query group: its 2 query heads, then its key, then its value head
    assert rank_rows == [[100, 101, 200, 300], [102, 103, 201, 301]]


def test_fc1_shards_are_gate_then_up_per_rank():
    gate = torch.arange(6.0)[:, None]
    up = 10 + torch.arange(6.0)[:, None]
    shards = [split_for_rank("gated", [gate, up], CFG, r, 2)[:, 0].tolist() for r in range(2)]
    assert shards == [[0, 1, 2, 10, 11, 12], [3, 4, 5, 13, 14, 15]]


def test_layer_map_covers_local_and_te_names():
    hf = {h for _, hs in _LAYER_MAP.values() for h in hs}
    assert {"self_attn.q_norm.weight", "mlp.down_proj.weight", "self_attn.q_proj.bias"} <= hf
    assert _LAYER_MAP["mlp.linear_fc1.layer_norm_weight"] == _LAYER_MAP["pre_mlp_layernorm.weight"]


def test_hf_source_reads_sharded_safetensors_dir(tmp_path):
    import json

    from safetensors.torch import save_file

    a, b = torch.randn(3, 2), torch.randn(4)
    save_file({"a": a}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"b": b}, str(tmp_path / "model-00002-of-00002.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    src = HFSource(tmp_path)
    assert "a" in src and "c" not in src
    assert torch.equal(src.get("a"), a) and torch.equal(src.get("b"), b)
    with pytest.raises(KeyError):
        src.get("c")
