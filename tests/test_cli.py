from __future__ import annotations

import subprocess
import sys

import pytest

from fedsplit.cli import main


def test_check_split_passes_and_prints_differences(capsys):
    code = main(
        ["check-split", "--model", "tiny-mistral", "--head-layers", "2", "--tail-layers", "2", "--train-steps", "2"]
    )

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


def test_key_file_problems_are_one_clear_error_line(tmp_path, capsys):
    # Arrange: keys already there
    assert main(["keygen", "--out", str(tmp_path), "--name", "client-0"]) == 0
    capsys.readouterr()

    # Act
    code = main(["keygen", "--out", str(tmp_path), "--name", "client-0"])

    # Assert
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.startswith("fedsplit keygen: error: refusing to overwrite existing key material")
    assert err.count("\n") == 1


def test_keygen_host_puts_names_and_addresses_in_the_server_certificate(tmp_path, capsys):
    from cryptography import x509

    from fedsplit.security.tls import certificate_names, certificate_names_host

    code = main(["keygen", "--out", str(tmp_path), "--ca", "--host", "10.1.2.3,fl.example.org", "--host", "fd00::7"])

    cert = x509.load_pem_x509_certificate((tmp_path / "server-tls.crt").read_bytes())
    assert code == 0
    assert certificate_names(cert) == ["fl.example.org", "localhost", "10.1.2.3", "fd00::7", "127.0.0.1", "::1"]
    assert all(certificate_names_host(cert, host) for host in ("10.1.2.3", "FL.example.org", "fd00::7", "127.0.0.1"))
    assert not certificate_names_host(cert, "10.1.2.4")


def test_keygen_refuses_a_bad_host_before_writing_anything(tmp_path, capsys):
    code = main(["keygen", "--out", str(tmp_path / "k"), "--ca", "--host", "bad host!"])

    err = capsys.readouterr().err
    assert code == 2 and "'bad host!' is neither an IP address nor a valid DNS name" in err and "Traceback" not in err
    assert not (tmp_path / "k").exists() or not any((tmp_path / "k").iterdir())
    with pytest.raises(SystemExit, match="needs --ca"):
        main(["keygen", "--out", str(tmp_path / "k2"), "--host", "10.0.0.1"])


@pytest.mark.parametrize("command", ["server", "client", "simulate", "centralized", "demo"])
def test_a_configuration_error_shows_before_torch_is_imported(tmp_path, command):
    # A fresh interpreter: the suite itself has imported torch long ago.
    bad = tmp_path / "run.toml"
    bad.write_text("[train]\nlr = -1.0\n")
    code = (
        "import sys\n"
        "from fedsplit.cli import main\n"
        f"status = main([{command!r}, '--config', {str(bad)!r}])\n"
        "print('torch' in sys.modules, status)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)

    assert out.stdout.split() == ["False", "2"], out.stdout + out.stderr
    assert f"fedsplit {command}: error: {bad}: [train] TrainConfig: train.lr: got invalid value -1.0" in out.stderr
