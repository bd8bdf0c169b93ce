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


def test_bad_cut_is_one_clear_error_line(capsys):
    code = main(["check-split", "--model", "tiny-llama", "--head-layers", "3", "--tail-layers", "3"])

    err = capsys.readouterr().err
    assert code == 2
    assert "head_layers + tail_layers must be < the model's 6 blocks" in err and "Traceback" not in err


def test_unknown_config_key_names_file_and_key(tmp_path, capsys):
    path = tmp_path / "run.toml"
    path.write_text("[train]\nlearning_rate = 1e-4\n")

    code = main(["centralized", "--config", str(path)])

    err = capsys.readouterr().err
    assert code == 2 and "learning_rate" in err and "run.toml" in err


def test_insecure_in_config_needs_the_flag(tmp_path):
    path = tmp_path / "server.toml"
    path.write_text("[security]\ninsecure = true\n")

    with pytest.raises(SystemExit, match="needs the explicit --insecure flag"):
        main(["server", "--config", str(path)])
