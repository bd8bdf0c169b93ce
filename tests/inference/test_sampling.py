"""Token choice and stop strings: pure functions on tiny tensors."""

from __future__ import annotations

import pytest
import torch

from fedsplit.inference.sampling import SamplingSettings, StopText, filter_logits, next_tokens


def test_greedy_takes_the_argmax_of_each_row():
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, 0.0, 1.0]])

    assert next_tokens(logits, SamplingSettings(), None).tolist() == [1, 0]


def test_top_k_and_top_p_remove_the_unlikely_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))

    top_k = filter_logits(logits, 1.0, top_k=2)
    top_p = filter_logits(logits, 1.0, top_p=0.8)  # 0.5 + 0.3 reaches 0.8: the rest goes

    assert torch.isinf(top_k).tolist() == [[False, False, True, True]]
    assert torch.isinf(top_p).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, 1.0, top_p=0.01)).tolist() == [[False, True, True, True]]


def test_sampling_follows_the_seed_and_never_picks_a_filtered_token():
    logits = torch.zeros(1, 50)
    settings = SamplingSettings(temperature=1.0, top_k=3)
    logits[0, [4, 9, 20]] = 2.0

    picks = [int(next_tokens(logits, settings, torch.Generator().manual_seed(s))[0]) for s in range(30)]

    assert set(picks) <= {4, 9, 20} and len(set(picks)) > 1
    assert picks == [int(next_tokens(logits, settings, torch.Generator().manual_seed(s))[0]) for s in range(30)]


@pytest.mark.parametrize("stop", ["###", ["ok", 5], [b"x"]])
def test_stop_strings_of_another_type_are_refused(stop):
    with pytest.raises(TypeError, match="stop: expected"):
        SamplingSettings(stop=stop)


@pytest.mark.parametrize("field,value", [("max_new_tokens", 0), ("temperature", -1.0), ("top_k", -2),
                                         ("top_p", 0.0), ("top_p", 1.5)])
def test_bad_settings_say_what_was_expected(field, value):
    with pytest.raises(ValueError, match=f"{field}: expected .* got"):
        SamplingSettings(**{field: value})


def test_stop_text_holds_back_a_possible_stop_string_and_cuts_at_it():
    text = StopText(["</s>"])

    shown = [text.update(t) for t in ("Hel", "Hello <", "Hello </", "Hello </s> more")]

    assert shown == [("", False), ("Hell", False), ("o", False), (" ", True)]
    assert StopText.cut("a</s>b", ["</s>"]) == "a"


def test_stop_text_never_shows_half_a_character():
    text = StopText([])

    assert text.update("caf\ufffd") == ("caf", False)
    assert text.update("café") == ("é", False)
    assert text.finish("café!") == "!"
