"""Bounds on what one client can do to the global client parts (hardening of FedAvg, McMahan et al. 2017).

Plain FedAvg lets a client choose its own weight (it reports ``num_examples``) and its own update,
so one client claiming ``2**64 - 1`` examples, or sending adapters of 1e4 everywhere, *becomes*
the global model. The weight is capped by :func:`fedsplit.strategy.aggregate.cap_shares`
(``FedAvg.max_share``); the update itself by its distance to the current global parts:

* :func:`linf_distance`: how far an update moved from the current global parts, per element. An
  AdamW step moves each element by at most about ``lr * (1 - beta1) / sqrt(1 - beta2)`` (Kingma &
  Ba 2015, Sec. 2.1: 3.2 x lr for the default betas), so ``local_steps`` steps move it by at most a
  small multiple of ``local_steps * lr``; the round coordinator refuses updates beyond
  ``update_bound_factor`` times that.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from torch import Tensor


def linf_distance(update: Mapping[str, Tensor], current: Mapping[str, Tensor]) -> tuple[float, str]:
    """Largest ``|update - current|`` over every element, and the key where it is."""
    worst, where = 0.0, ""
    for key, reference in current.items():
        delta = float((update[key].double() - reference.double()).abs().max()) if reference.numel() else 0.0
        if delta > worst or not math.isfinite(delta):
            worst, where = delta, key
    return worst, where


def l2_distance(update: Mapping[str, Tensor], current: Mapping[str, Tensor]) -> float:
    """``||update - current||_2`` over all tensors (float64)."""
    return math.sqrt(math.fsum(float((update[k].double() - v.double()).pow(2).sum()) for k, v in current.items()))
