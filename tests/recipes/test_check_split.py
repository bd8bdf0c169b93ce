from __future__ import annotations

import pytest

from fedsplit.recipes.check_split import check_split


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-qwen2"])
def test_lora_training_split_equals_centralized(tiny_models, name):
    model, _ = tiny_models[name]

    result = check_split(model, 2, 1, train_steps=5)

    assert result.params_after_training is not None
    assert result.params_after_training <= 1e-5
    assert result.ok


def test_check_reports_failure_above_tolerance(tiny_models):
    model, _ = tiny_models["tiny-llama"]

    result = check_split(model, 1, 1, tolerance=-1.0)

    assert not result.ok
