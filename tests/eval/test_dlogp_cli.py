"""``delta-megatron eval --rl`` and ``delta-megatron analyze dlogp`` end to end on two tiny HF models
with the synthetic task's tokenizer: the files, their consistency, reproducibility and the errors."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from delta_megatron.cli import main as cli_main
from delta_megatron.data.synthetic import VOCAB
from delta_megatron.data.tokenizer import save_char_tokenizer

RECIPE = ["--recipe", "pipelines.tiny_arith_cpu:smoke_config"]


def _hf_dir(path, seed: int, vocab: int = len(VOCAB), noise: float = 0.0):
    """A 1-layer Qwen3 over the character vocabulary, saved with the character tokenizer."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=8, tie_word_embeddings=True,
                      max_position_embeddings=64, initializer_range=0.5, pad_token_id=0, bos_token_id=1,
                      eos_token_id=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(cfg)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(noise * torch.randn_like(p))
    model.save_pretrained(path)
    if vocab == len(VOCAB):
        save_char_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("dlogp_models")
    return _hf_dir(root / "base", 0), _hf_dir(root / "rl", 0, noise=0.3)


def test_eval_compares_four_decodings_reproducibly(models, tmp_path, capsys):
    base, rl = models
    args = ["eval", *RECIPE, "--model", str(base), "--rl", str(rl), "--tau", "-0.3", "--gamma", "0.05",
            "--top-p", "0.9", "eval.k=2", "eval.max_prompts=6", f"data.tokenizer={base}"]
    assert cli_main([*args, "--out", str(tmp_path / "a")]) == 0
    table = (tmp_path / "a" / "eval.md").read_text()
    assert "tau=-0.3, gamma=0.05, candidates=50, temperature=1.0, top_p=0.9, k=2" in table
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in table.splitlines()
            if "avg (weighted)" in line}
    assert list(rows) == ["base", "replace (γ=0)", "extrapolate (γ=0.05)", "rl"]
    assert rows["base"][-2:] == ["0.00", "0.00 |"]  # nothing resampled
    assert rows["rl"][-2:] == ["–", "– |"]  # one model: no resampling column
    assert float(rows["replace (γ=0)"][-2]) > 0 and float(rows["extrapolate (γ=0.05)"][-2]) > 0
    for name in ("base", "replace", "extrapolate", "rl"):
        assert (tmp_path / "a" / f"eval_{name}.csv").is_file()
    assert cli_main([*args, "--out", str(tmp_path / "b")]) == 0  # same seeds, same numbers
    assert (tmp_path / "b" / "eval.md").read_text() == table
    assert torch.is_grad_enabled()  # in-process callers (these tests) keep their grad mode
    capsys.readouterr()


def test_analyze_dlogp_writes_consistent_report(models, tmp_path):
    base, rl = models
    run = tmp_path / "run"  # a run directory whose samples.jsonl carries λ̄ of two responses
    run.mkdir()
    rows = [{"prompt_ids": [1, 4, 13, 5, 14], "response_ids": [7, 2], "credit": [1.2, 0.9], "advantage": 1.0},
            {"prompt_ids": [1, 6, 13, 6, 14], "response_ids": [9, 10, 2], "credit": [0.8, 1.1, 1.0],
             "advantage": -1.0}]
    (run / "samples.jsonl").write_text(json.dumps({"step": 0, "samples": rows}) + "\n")
    out = tmp_path / "out"
    assert cli_main(["analyze", "dlogp", "--base", str(base), "--rl", str(rl), "--data", "synthetic:arith@eval",
                     *RECIPE, "--out", str(out), "--k", "2", "--max-prompts", "5", "--rates", "0.25",
                     "--lambda-run", str(run), f"data.tokenizer={base}"]) == 0
    assert torch.is_grad_enabled()
    for name in ("dlogp.md", "dlogp_histograms.png", "replacement_curve.png", "lambda_vs_dlogp.png"):
        assert (out / name).stat().st_size > 0, name
    with open(out / "token_stats.csv") as fh:
        tokens = list(csv.DictReader(fh))
    assert {t["sampled_by"] for t in tokens} == {"base", "rl"}
    assert len({(t["sampled_by"], t["response"]) for t in tokens}) == 2 * 2 * 5  # k × prompts × sources
    for t in tokens:
        assert float(t["dlogp"]) == pytest.approx(float(t["logp_rl"]) - float(t["logp_base"]), abs=2e-6)
        assert float(t["kl_rl_base"]) >= -1e-6
    report = (out / "dlogp.md").read_text()
    section = report.split("## Selective replacement curve")[1].split("##")[0]
    curve = [line for line in section.splitlines() if line.startswith("| ") and "%" in line]
    assert [line.split(" | ")[0] for line in curve] == ["| none", "| all", "| dlogp", "| kl", "| entropy",
                                                         "| random"]
    assert "| none |  | 0.0% | 0.0% |" in report and "| all |  | 100.0% | 100.0% |" in report
    assert "| all | 5 |" in report  # λ̄ correlation over the 5 recorded tokens


def test_errors_name_the_argument(models, tmp_path, capsys):
    base, _ = models
    with pytest.raises(FileNotFoundError, match=r"--rl .*missing: no such directory"):
        cli_main(["analyze", "dlogp", "--base", str(base), "--rl", str(tmp_path / "missing"), "--data",
                  "synthetic:arith@eval", *RECIPE, "--out", str(tmp_path / "o"), f"data.tokenizer={base}"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"--rl .*empty: neither an HF model directory"):
        cli_main(["eval", *RECIPE, "--model", str(base), "--rl", str(tmp_path / "empty"), "eval.max_prompts=1",
                  f"data.tokenizer={base}", "--out", str(tmp_path / "o")])
    wide = _hf_dir(tmp_path / "wide", 0, vocab=len(VOCAB) + 3)
    with pytest.raises(ValueError, match=r"--rl .*wide: the RL model has a 20-token vocabulary.*17"):
        cli_main(["eval", *RECIPE, "--model", str(base), "--rl", str(wide), "eval.max_prompts=1",
                  f"data.tokenizer={base}", "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit):
        cli_main(["eval", *RECIPE, "--model", str(base), "--rl", str(base), "--temperature", "0",
                  f"data.tokenizer={base}"])
    assert "temperature" in capsys.readouterr().err
