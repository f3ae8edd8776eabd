"""``delta-megatron eval`` argument handling (the sampling path needs a model: see the report)."""

import pytest

from delta_megatron.cli_eval import main


def test_eval_cli_without_weights_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["data.synthetic_size=6", "eval.k=2"])
    assert exc.value.code == 2
    assert "no weights to evaluate: pass --model <HF dir> or set model.hf_path" in capsys.readouterr().err


def test_eval_cli_rejects_bad_overrides():
    from delta_megatron.utils.configs import ConfigError

    with pytest.raises(ConfigError, match=r"eval\.kk"):
        main(["eval.kk=2"])
