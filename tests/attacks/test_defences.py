from __future__ import annotations

import math

import pytest

from fedsplit.adapters import LoraSettings
from fedsplit.attacks.defences import Defence, finetune
from fedsplit.models import load_model
from fedsplit.train.config import TrainConfig

from tiny import token_batch

CFG = TrainConfig(lr=5e-3, schedule="constant")
STEPS = 4


def _run(defence: Defence):
    model, _ = load_model("tiny-llama")
    train = [token_batch(200, batch=2, length=16, seed=s) for s in range(STEPS)]
    return finetune(
        model, defence, train, [token_batch(200, batch=2, length=16, seed=99)], CFG, STEPS, lora=LoraSettings(r=2)
    )


@pytest.fixture(scope="module")
def baseline():
    return _run(Defence(1, 0.0))


def test_fine_tune_without_defence_lowers_the_loss(baseline):
    assert baseline.train_losses[-1] < baseline.train_losses[0]
    assert math.isfinite(baseline.heldout_loss) and baseline.zero_shot_loss > 0


@pytest.mark.parametrize("defence", [Defence(2, 1.0), Defence(1, 0.1, adversarial_weight=1.0)], ids=lambda d: d.name)
def test_defended_fine_tunes_start_from_the_same_model_and_end_elsewhere(baseline, defence):
    defended = _run(defence)

    assert defended.zero_shot_loss == baseline.zero_shot_loss  # the cut depth does not change the model
    assert defended.heldout_loss != baseline.heldout_loss
    assert len(defended.train_losses) == STEPS and all(math.isfinite(x) for x in defended.train_losses)
