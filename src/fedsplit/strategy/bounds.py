"""Bounds on what one client can do to the global client parts (hardening of FedAvg, McMahan et al. 2017).

Plain FedAvg lets a client choose its own weight (it reports ``num_examples``) and its own update,
so one client claiming ``2**64 - 1`` examples, or sending adapters of 1e4 everywhere, *becomes*
the global model. Two pure functions close that:

* :func:`cap_shares`: no client's share of the total weight exceeds ``max_share`` (water-filling:
  the largest weights are lowered to a common cap, the others keep their proportions).
* :func:`linf_distance`: how far an update moved from the current global parts, per element. An
  AdamW step moves each element by at most about ``lr * (1 - beta1) / sqrt(1 - beta2)`` (Kingma &
  Ba 2015, Sec. 2.1: 3.2 x lr for the default betas), so ``local_steps`` steps move it by at most a
  small multiple of ``local_steps * lr``; the round coordinator refuses updates beyond
  ``update_bound_factor`` times that.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from torch import Tensor


def cap_shares(weights: Sequence[float], max_share: float) -> list[float]:
    """Lower the largest ``weights`` so that none is more than ``max_share`` of their sum.

    The cap is ``max(max_share, 1 / n)`` (n clients cannot all stay under 1/n). Weights under the
    cap are unchanged; capped ones all equal the cap ``c``, chosen so that ``c / sum = max_share``.
    """
    if not 0.0 < max_share <= 1.0:
        raise ValueError(f"max_share: expected a value in (0, 1], got {max_share}")
    if max_share >= 1.0:
        return list(weights)
    values = [float(w) for w in weights]
    if any(not math.isfinite(w) or w < 0 for w in values):
        raise ValueError(f"weights: expected finite values >= 0, got {values}")
    live = [w for w in values if w > 0]
    if len(live) <= 1:
        return values
    share = max(max_share, 1.0 / len(live))
    ordered = sorted(live, reverse=True)
    for k in range(1, len(ordered) + 1):  # cap the k largest at c; the others keep their weight
        rest = math.fsum(ordered[k:])  # summed afresh: subtracting a huge claim would cancel the rest
        if k * share >= 1.0:
            cap = ordered[k - 1]  # every live weight capped: all equal
            break
        cap = share * rest / (1.0 - k * share)
        if k == len(ordered) or ordered[k] <= cap:
            break
    if cap >= ordered[0]:
        return values
    return [min(w, cap) for w in values]


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
