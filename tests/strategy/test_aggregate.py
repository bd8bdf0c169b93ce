from __future__ import annotations

import pytest
import torch

from fedsplit.strategy.aggregate import AggregationError, weighted_average


def _state(a: list[float], b: float) -> dict[str, torch.Tensor]:
    return {"head/lora_A": torch.tensor(a), "tail/lora_B": torch.tensor([[b]])}


def test_weighted_average_matches_hand_computed_mean() -> None:
    # Arrange: weights 1 and 3 -> (1*x + 3*y) / 4
    updates = [(_state([1.0, 2.0], 4.0), 1.0), (_state([5.0, 6.0], 8.0), 3.0)]

    # Act
    merged = weighted_average(updates)

    # Assert
    assert torch.equal(merged["head/lora_A"], torch.tensor([4.0, 5.0]))
    assert torch.equal(merged["tail/lora_B"], torch.tensor([[7.0]]))


def test_zero_weight_drops_an_update() -> None:
    updates = [(_state([1.0, 1.0], 1.0), 2.0), (_state([9.0, 9.0], 9.0), 0.0)]

    merged = weighted_average(updates)

    assert torch.equal(merged["head/lora_A"], torch.tensor([1.0, 1.0]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_result_keeps_each_tensors_dtype(dtype: torch.dtype) -> None:
    first, second = torch.tensor([0.1, 0.2], dtype=dtype), torch.tensor([0.3, 0.4], dtype=dtype)
    updates = [({"w": first}, 1.0), ({"w": second}, 1.0)]

    merged = weighted_average(updates)

    assert merged["w"].dtype == dtype
    expected = ((first.double() + second.double()) / 2).to(dtype)
    assert torch.equal(merged["w"], expected)


def test_accumulates_in_float64_not_in_the_input_dtype() -> None:
    # Arrange: in bf16, 256 + 1 rounds back to 256, so a bf16 running sum would lose every 1
    updates = [({"w": torch.tensor([256.0], dtype=torch.bfloat16)}, 1.0)]
    updates += [({"w": torch.tensor([1.0], dtype=torch.bfloat16)}, 1.0) for _ in range(4)]

    # Act: exact mean = (256 + 4) / 5 = 52; a bf16 sum would give 256 / 5 -> 51.25
    merged = weighted_average(updates)

    # Assert
    assert merged["w"].item() == 52.0


def test_input_order_does_not_change_the_result() -> None:
    generator = torch.Generator().manual_seed(0)
    updates = [({"w": torch.randn(64, generator=generator)}, float(n)) for n in (3, 7, 11, 5)]

    forward = weighted_average(updates)
    backward = weighted_average(updates[::-1])

    assert torch.equal(forward["w"], backward["w"])


def test_missing_key_names_the_update_and_key() -> None:
    updates = [(_state([1.0, 2.0], 3.0), 1.0), ({"head/lora_A": torch.tensor([1.0, 2.0])}, 1.0)]

    expected = r"client-b.*: keys do not match the reference: missing 1 \['tail/lora_B'\]"
    with pytest.raises(AggregationError, match=expected):
        weighted_average(updates, labels=["client-a", "client-b"])


def test_shape_mismatch_names_key_expected_and_got() -> None:
    updates = [(_state([1.0, 2.0], 3.0), 1.0), (_state([1.0, 2.0, 3.0], 3.0), 1.0)]

    expected = r"update 1\[head/lora_A\]: expected shape \(2,\), got \(3,\)"
    with pytest.raises(AggregationError, match=expected):
        weighted_average(updates)


def test_dtype_mismatch_is_rejected() -> None:
    updates = [({"w": torch.ones(2)}, 1.0), ({"w": torch.ones(2, dtype=torch.float16)}, 1.0)]

    with pytest.raises(AggregationError, match="expected dtype torch.float32, got torch.float16"):
        weighted_average(updates)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_tensor_names_the_key(bad: float) -> None:
    updates = [(_state([1.0, 2.0], 3.0), 1.0), (_state([1.0, bad], 3.0), 1.0)]

    with pytest.raises(AggregationError, match="update 1: key 'head/lora_A': expected finite"):
        weighted_average(updates)


def test_integer_tensors_are_rejected() -> None:
    with pytest.raises(AggregationError, match="expected a floating dtype, got torch.int64"):
        weighted_average([({"steps": torch.tensor([3])}, 1.0)])


@pytest.mark.parametrize(
    "weights", [(-1.0, 2.0), (float("nan"), 1.0), (float("inf"), 1.0), (0.0, 0.0)]
)
def test_bad_weights_are_rejected(weights: tuple[float, float]) -> None:
    updates = [(_state([1.0, 2.0], 3.0), weights[0]), (_state([1.0, 2.0], 3.0), weights[1])]

    with pytest.raises(AggregationError, match="weight"):
        weighted_average(updates)


def test_no_updates_is_an_error() -> None:
    with pytest.raises(AggregationError, match="expected at least one update, got none"):
        weighted_average([])


def test_labels_must_match_updates() -> None:
    with pytest.raises(ValueError, match="expected 1 labels"):
        weighted_average([(_state([1.0, 2.0], 3.0), 1.0)], labels=["a", "b"])
