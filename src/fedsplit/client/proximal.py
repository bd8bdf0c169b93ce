"""FedProx on the client parts of FL-GLM (Li et al., MLSys 2020; arXiv 2406.14898 for the split).

When a round's plan carries ``settings[PROXIMAL_MU]`` > 0 the client adds the gradient of
``mu/2 * ||w - w_global||^2`` over its head/tail LoRA parameters at every optimizer step, after
the micro-batches' backward passes and before the global-norm clip (``SplitClient.before_step``),
so the clip coefficient sees the full gradient. ``w_global`` is the round's global client parts,
as received in the plan. With ``mu = 0`` (or no setting) nothing is installed: the step is FedAvg's,
bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

from torch import Tensor

from fedsplit.adapters import adapter_parameters
from fedsplit.split.parts import Head, Tail
from fedsplit.strategy.fedprox import PROXIMAL_MU, add_proximal_grad_

HEAD_PREFIX, TAIL_PREFIX = "head/", "tail/"  # the keys of the client update (runner.client_adapters)


def proximal_mu(settings: Mapping[str, str]) -> float:
    """The plan's ``mu`` (0 when absent); a value that is not a finite number >= 0 is a ValueError."""
    raw = settings.get(PROXIMAL_MU, "0")
    try:
        mu = float(raw)
    except ValueError:
        raise ValueError(f"RoundPlan.settings[{PROXIMAL_MU!r}]: expected a number, got {raw!r}") from None
    if not (math.isfinite(mu) and mu >= 0):
        raise ValueError(f"RoundPlan.settings[{PROXIMAL_MU!r}]: expected a finite value >= 0, got {raw!r}")
    return mu


def proximal_hook(
    head: Head, tail: Tail, global_parts: Mapping[str, Tensor], settings: Mapping[str, str]
) -> Callable[[], None] | None:
    """``param.grad += mu (param - global)`` over the client parts, or ``None`` when ``mu`` is 0."""
    mu = proximal_mu(settings)
    if mu == 0.0:
        return None
    params = {HEAD_PREFIX + k: p for k, p in adapter_parameters(head).items()}
    params.update({TAIL_PREFIX + k: p for k, p in adapter_parameters(tail).items()})
    params = {key: p for key, p in params.items() if p.requires_grad}
    anchors = {key: global_parts[key].detach().clone() for key in params if key in global_parts}

    def add_proximal_grad() -> None:
        add_proximal_grad_(params, anchors, mu)  # KeyError naming the key if a global tensor is missing

    return add_proximal_grad
