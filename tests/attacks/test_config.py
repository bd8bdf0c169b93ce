from __future__ import annotations

import pytest

from fedsplit.attacks.config import AttackSettings, quick_settings
from fedsplit.config import PrivacyConfig, RunConfig
from fedsplit.configio import load_config


def test_privacy_section_fills_from_overrides():
    cfg = load_config(RunConfig, None, ["privacy.hidden_noise_std=0.5", "privacy.audit=true"])

    assert cfg.privacy.hidden_noise_std == 0.5 and cfg.privacy.audit is True


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("hidden_noise_std", -1.0, "privacy.hidden_noise_std: expected >= 0, got -1.0"),
        ("audit_samples", 0, "privacy.audit_samples: expected >= 1, got 0"),
    ],
)
def test_privacy_config_states_its_contract(field, value, words):
    with pytest.raises(ValueError, match=words):
        PrivacyConfig(**{field: value})


def test_attack_settings_need_the_undefended_point_and_valid_points():
    with pytest.raises(ValueError, match="expected 0.0"):
        AttackSettings(sigmas=(0.5,))
    with pytest.raises(ValueError, match="'p:sigma'"):
        AttackSettings(extra_points=("4-2",))
    assert quick_settings(threads=1).threads == 1
