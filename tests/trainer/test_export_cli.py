"""``delta-megatron export RUN OUT``: a trainer checkpoint exported to HF loads in transformers with
exactly the weights the rollout engine received after the last step, plus the run's tokenizer."""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from delta_megatron.cli import main as cli_main
from delta_megatron.config import load_config
from delta_megatron.parallel import destroy, init_distributed
from delta_megatron.trainer import Trainer
from pipelines.tiny_arith_cpu import smoke_config


def test_export_checkpoint_round_trip(tmp_path):
    cfg = load_config(base=smoke_config(str(tmp_path), "delta", steps=1), overrides=["data.synthetic_digits=1"])
    init_distributed(cfg.parallel, seed=cfg.train.seed)
    try:
        trainer = Trainer(cfg)
        trainer.fit()  # saves a checkpoint after the last step
        engine_weights = {n: p.detach().clone() for n, p in trainer.engine.named_weights()}
    finally:
        destroy()
    run_dir = tmp_path / "delta"
    assert cli_main(["export", str(run_dir), str(tmp_path / "hf")]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    exported = model.state_dict()
    for name, value in engine_weights.items():
        assert torch.equal(exported[name], value), name
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok("12+3=")["input_ids"][1:] == [4, 5, 13, 6, 14]  # char ids: '1'=4 '2'=5 '+'=13 '3'=6 '='=14
