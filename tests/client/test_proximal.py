"""FedProx on the network client: the proximal gradient on the client parts, mu = 0 is FedAvg bit for bit."""

from __future__ import annotations

import pytest
import torch

from fedsplit.adapters import adapter_parameters
from fedsplit.client.proximal import proximal_hook, proximal_mu
from fedsplit.client.runner import client_adapters
from fedsplit.strategy import PROXIMAL_MU

from tiny import build_model


def test_the_hook_adds_mu_times_the_distance_to_the_global_parts():
    # Arrange: parameters moved away from the global parts, with a gradient already accumulated
    _, parts = build_model()
    global_parts = client_adapters(parts.head, parts.tail)
    params = {f"head/{k}": p for k, p in adapter_parameters(parts.head).items()}
    params.update({f"tail/{k}": p for k, p in adapter_parameters(parts.tail).items()})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in params.values():
            p.add_(torch.randn(p.shape, generator=g))
            p.grad = torch.ones_like(p)

    # Act
    hook = proximal_hook(parts.head, parts.tail, global_parts, {PROXIMAL_MU: "0.5"})
    assert hook is not None
    hook()

    # Assert
    for key, p in params.items():
        torch.testing.assert_close(p.grad, 1 + 0.5 * (p.detach() - global_parts[key]), rtol=0, atol=1e-6)


def test_no_hook_without_mu_and_a_bad_mu_is_refused():
    _, parts = build_model()
    global_parts = client_adapters(parts.head, parts.tail)

    assert proximal_hook(parts.head, parts.tail, global_parts, {}) is None
    assert proximal_hook(parts.head, parts.tail, global_parts, {PROXIMAL_MU: "0.0"}) is None
    for bad in ("-1", "nan", "inf", "lots"):
        with pytest.raises(ValueError, match="proximal_mu"):
            proximal_mu({PROXIMAL_MU: bad})
