from __future__ import annotations

import pytest
import torch

from fedsplit.strategy import (
    AggregationError,
    ClientUpdate,
    Failure,
    FedAvg,
    NotEnoughClientsError,
    Strategy,
    TooFewResults,
    weighted_metrics,
)


def _update(client_id: str, value: float, num_examples: int, **metrics: float) -> ClientUpdate:
    tensors = {"head/lora_A": torch.full((2, 2), value), "tail/lora_B": torch.full((3,), -value)}
    return ClientUpdate(
        client_id=client_id, tensors=tensors, num_examples=num_examples, metrics=dict(metrics)
    )


CURRENT = {"head/lora_A": torch.zeros(2, 2), "tail/lora_B": torch.zeros(3)}


def test_fedavg_satisfies_the_strategy_protocol() -> None:
    assert isinstance(FedAvg(local_steps=1, lr=0.1), Strategy)


def test_aggregate_is_the_example_weighted_mean() -> None:
    # Arrange: weights 10 and 30 -> (10*1 + 30*5) / 40 = 4; loss (10*2 + 30*1) / 40 = 1.25
    strategy = FedAvg(local_steps=2, lr=0.1)
    results = [_update("a", 1.0, 10, loss=2.0), _update("b", 5.0, 30, loss=1.0)]

    # Act
    out = strategy.aggregate(1, results, [], CURRENT)

    # Assert
    assert torch.equal(out.tensors["head/lora_A"], torch.full((2, 2), 4.0))
    assert torch.equal(out.tensors["tail/lora_B"], torch.full((3,), -4.0))
    assert out.num_examples == 40
    assert out.clients == ["a", "b"]
    assert out.metrics == {"loss": 1.25, "num_results": 2, "num_failures": 0}


def test_failures_arrive_as_data_and_are_counted() -> None:
    strategy = FedAvg(local_steps=1, lr=0.1, min_clients=1)
    failures = [Failure(client_id="c", reason="timeout after 30 s", stage="train")]

    out = strategy.aggregate(3, [_update("a", 2.0, 5)], failures, CURRENT)

    assert out.metrics["num_failures"] == 1
    assert out.clients == ["a"]


def test_too_few_results_lists_results_and_failure_reasons() -> None:
    strategy = FedAvg(local_steps=1, lr=0.1, min_clients=2)
    failures = [
        Failure(client_id="b", reason="timeout after 30 s", stage="train"),
        Failure(client_id="c", reason="connection reset", stage="upload"),
    ]

    out = strategy.aggregate(4, [_update("a", 1.0, 5)], failures, CURRENT)

    assert isinstance(out, TooFewResults)
    message = out.reason
    assert "round 4: expected at least 2 results, got 1" in message
    assert "results: a;" in message
    assert "b at stage 'train': timeout after 30 s" in message
    assert "c at stage 'upload': connection reset" in message
    assert out.failures == failures


def test_result_order_does_not_matter() -> None:
    strategy = FedAvg(local_steps=1, lr=0.1)
    generator = torch.Generator().manual_seed(1)
    results = [
        ClientUpdate(
            client_id=f"c{i}",
            tensors={"w": torch.randn(32, generator=generator)},
            num_examples=i + 1,
            metrics={},
        )
        for i in range(5)
    ]

    forward = strategy.aggregate(1, results, [], {})
    backward = strategy.aggregate(1, results[::-1], [], {})

    assert torch.equal(forward.tensors["w"], backward.tensors["w"])
    assert forward.clients == backward.clients == ["c0", "c1", "c2", "c3", "c4"]


def test_update_not_matching_current_names_the_client() -> None:
    strategy = FedAvg(local_steps=1, lr=0.1)
    tensors = {"head/lora_A": torch.zeros(2, 2)}
    bad = ClientUpdate(client_id="x", tensors=tensors, num_examples=1, metrics={})

    expected = r"client 'x': keys do not match the global client parts: missing 1 \['tail/lora_B'\]"
    with pytest.raises(AggregationError, match=expected):
        strategy.aggregate(1, [bad], [], CURRENT)


def test_nan_update_is_rejected_naming_client_and_key() -> None:
    strategy = FedAvg(local_steps=1, lr=0.1)
    results = [_update("a", 1.0, 1), _update("b", float("nan"), 1)]

    with pytest.raises(AggregationError, match=r"b: key 'head/lora_A': expected finite values"):
        strategy.aggregate(1, results, [], CURRENT)


def test_duplicate_results_from_one_client_are_rejected() -> None:
    strategy = FedAvg(local_steps=1, lr=0.1)

    with pytest.raises(ValueError, match="one result per client"):
        strategy.aggregate(1, [_update("a", 1.0, 1), _update("a", 2.0, 1)], [], CURRENT)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_aggregate_preserves_low_precision_dtypes(dtype: torch.dtype) -> None:
    strategy = FedAvg(local_steps=1, lr=0.1)
    results = [
        ClientUpdate(
            client_id=c, tensors={"w": torch.full((4,), v, dtype=dtype)}, num_examples=1, metrics={}
        )
        for c, v in (("a", 0.5), ("b", 1.5))
    ]

    out = strategy.aggregate(1, results, [], {})

    assert out.tensors["w"].dtype == dtype
    assert torch.equal(out.tensors["w"], torch.full((4,), 1.0, dtype=dtype))


def test_weight_fn_replaces_example_counts() -> None:
    # Arrange: a robust weight that ignores client "evil" entirely
    def trusted_only(update: ClientUpdate) -> float:
        return 0.0 if update.client_id == "evil" else 1.0

    strategy = FedAvg(local_steps=1, lr=0.1, weight_fn=trusted_only)
    results = [
        _update("a", 1.0, 1, loss=1.0),
        _update("b", 3.0, 100, loss=3.0),
        _update("evil", 1e6, 1, loss=float("nan")),
    ]

    # Act
    out = strategy.aggregate(1, results, [], CURRENT)

    # Assert: plain mean of a and b; evil's weights and NaN loss do not count
    assert torch.equal(out.tensors["head/lora_A"], torch.full((2, 2), 2.0))
    assert out.metrics["loss"] == 2.0


def test_weighted_metrics_averages_only_over_reporters() -> None:
    results = [_update("a", 0.0, 1, loss=1.0, acc=0.5), _update("b", 0.0, 1, loss=3.0)]

    metrics = weighted_metrics(results, [1.0, 3.0])

    assert metrics == {"loss": 2.5, "acc": 0.5}


def test_sampling_is_deterministic_and_order_independent() -> None:
    strategy = FedAvg(local_steps=3, lr=2e-4, fraction=0.3, seed=7)
    available = [f"client-{i:02d}" for i in range(10)]

    first = strategy.configure_round(5, available)
    again = strategy.configure_round(5, list(reversed(available)))

    assert first == again
    assert len(first.client_ids) == 3
    assert set(first.client_ids) <= set(available)
    assert first.settings == {"local_steps": 3, "lr": 2e-4}


def test_sampling_changes_with_round_and_seed() -> None:
    available = [f"c{i}" for i in range(20)]
    strategy = FedAvg(local_steps=1, lr=0.1, fraction=0.25, seed=0)

    by_round = {tuple(strategy.configure_round(r, available).client_ids) for r in range(1, 6)}
    other_seed = FedAvg(local_steps=1, lr=0.1, fraction=0.25, seed=1).configure_round(1, available)

    assert len(by_round) > 1
    assert other_seed.client_ids != strategy.configure_round(1, available).client_ids


def test_sample_size_respects_fraction_and_min_clients() -> None:
    assert FedAvg(local_steps=1, lr=0.1, fraction=0.3).sample_size(10) == 3
    assert FedAvg(local_steps=1, lr=0.1, fraction=0.01).sample_size(10) == 1
    assert FedAvg(local_steps=1, lr=0.1, fraction=0.1, min_clients=4).sample_size(10) == 4
    assert FedAvg(local_steps=1, lr=0.1, fraction=1.0).sample_size(7) == 7


def test_too_few_available_clients_is_an_error() -> None:
    strategy = FedAvg(local_steps=1, lr=0.1, min_clients=3)

    with pytest.raises(NotEnoughClientsError, match="expected at least 3 available clients, got 2"):
        strategy.configure_round(1, ["a", "b"])


def test_duplicate_available_ids_are_rejected() -> None:
    with pytest.raises(ValueError, match="unique client ids"):
        FedAvg(local_steps=1, lr=0.1).configure_round(1, ["a", "a"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"local_steps": 0, "lr": 0.1}, "local_steps: expected an int >= 1, got 0"),
        ({"local_steps": 1, "lr": 0.0}, "lr: expected > 0, got 0.0"),
        ({"local_steps": 1, "lr": float("nan")}, "lr: expected a finite number"),
        ({"local_steps": 1, "lr": 0.1, "fraction": 1.5}, r"fraction: .* \(0, 1\], got 1.5"),
        ({"local_steps": 1, "lr": 0.1, "min_clients": 0}, "min_clients: expected an int >= 1"),
        ({"local_steps": 1, "lr": 0.1, "seed": -1}, "seed: expected an int >= 0, got -1"),
    ],
)
def test_invalid_settings_are_rejected(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FedAvg(**kwargs)  # type: ignore[arg-type]


def test_client_update_validates_its_fields() -> None:
    with pytest.raises(ValueError, match="num_examples: expected >= 0, got -1"):
        ClientUpdate(client_id="a", tensors={}, num_examples=-1, metrics={})
    with pytest.raises(TypeError, match=r"metrics\['loss'\]: expected a real number, got str"):
        metrics = {"loss": "low"}
        ClientUpdate(client_id="a", tensors={}, num_examples=1, metrics=metrics)  # type: ignore
    with pytest.raises(ValueError, match="client_id: expected a non-empty string"):
        ClientUpdate(client_id="", tensors={}, num_examples=1, metrics={})
