from __future__ import annotations

import pytest

from fedsplit.cli import main


def test_check_split_passes_and_prints_differences(capsys):
    code = main(["check-split", "--model", "tiny-mistral", "--head-layers", "2", "--tail-layers", "2", "--train-steps", "2"])

    out = capsys.readouterr().out
    assert code == 0
    assert "max |logit diff|" in out and "after 2 LoRA steps" in out and "OK" in out


def test_check_split_exits_non_zero_above_tolerance(capsys):
    code = main(["check-split", "--model", "tiny-llama", "--tolerance", "-1"])

    assert code == 1
    assert "FAIL" in capsys.readouterr().out


def test_config_prints_toml_that_describes_every_section(capsys):
    main(["config"])
    out = capsys.readouterr().out

    for section in ("[model]", "[train]", "[lora_head]", "[lora_trunk]", "[lora_tail]", "[data]", "[federation]"):
        assert section in out


def test_bad_cut_is_a_clear_error():
    with pytest.raises(Exception, match="head_layers \\+ tail_layers must be < the model's 6 blocks"):
        main(["check-split", "--model", "tiny-llama", "--head-layers", "3", "--tail-layers", "3"])
