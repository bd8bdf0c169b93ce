"""Client-batching for inference: several requests' decoding steps in one trunk pass (FL-GLM, arXiv 2406.14898).

Requests that ask for a step while the trunk is busy queue up; the next pass takes all of them::

    request a: cache (1, h, La, d), mask (1, La)  --.
    request b: cache (2, h, Lb, d), mask (2, Lb)  --+-- left-pad to L = max(La, Lb) -> cache (3, h, L, d), mask (3, L)
                                                      trunk on (3, 1, H) at each row's own position
    request a: cache[0:1, :, L - La:]  (La + 1)  <--+-- split back, each request's new position included
    request b: cache[1:3, :, L - Lb:]  (Lb + 1)  <--'

No request waits for another to arrive: a step that finds the trunk idle runs at once, alone
(no copying); only steps that arrive during a pass are batched into the next one. Padding is
masked, so each row attends to exactly its own cache. Only for trunks whose blocks all use full
attention (a sliding-window cache keeps a window per layer that padding would shift): for the
others every step runs alone. A P-tuning v2 trunk's caches start with its ``P`` prefix positions
(mask ones); the padding goes before them, so each row still sees its prefix, prompt and tokens.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from fedsplit.inference.cached import PartCache
from fedsplit.split.arch import FULL
from fedsplit.split.parts import SplitPart


@dataclass
class StepItem:
    """One request's step: its cache, the new hidden state (B, 1, H) and positions (B, 1)."""

    state: PartCache
    hidden: torch.Tensor
    positions: torch.Tensor
    output: torch.Tensor | None = None
    error: BaseException | None = None


def can_batch(part: SplitPart) -> bool:
    return all(kind == FULL for kind in part._kinds)


def combine(part: SplitPart, items: list[StepItem]) -> tuple[PartCache, torch.Tensor, torch.Tensor]:
    """One cache for all items' rows, left-padded to the longest; (cache, hidden (N, 1, H), positions (N, 1))."""
    length = max(item.state.length for item in items)
    combined = PartCache(part)
    masks = []
    for item in items:
        assert item.state.mask is not None, "a step needs a prefill"
        pad = length - item.state.length
        masks.append(torch.nn.functional.pad(item.state.mask, (pad, 0), value=False))  # (B_i, L)
    combined.mask = torch.cat(masks)  # (N, L)
    for layer in part.layer_indices:
        keys, values = [], []
        for item in items:
            source: Any = item.state.cache.layers[layer]  # a DynamicLayer: keys, values (B, h, L, d)
            pad = length - item.state.length
            keys.append(torch.nn.functional.pad(source.keys, (0, 0, pad, 0)))  # (B_i, h, L, d)
            values.append(torch.nn.functional.pad(source.values, (0, 0, pad, 0)))
        combined.cache.update(torch.cat(keys), torch.cat(values), layer)  # seeds the empty layer
    hidden = torch.cat([item.hidden for item in items])  # (N, 1, H)
    positions = torch.cat([item.positions for item in items])  # (N, 1)
    return combined, hidden, positions


def split_back(part: SplitPart, combined: PartCache, output: torch.Tensor, items: list[StepItem]) -> None:
    """Each item's rows of the combined cache (its own positions, the new one included) and output."""
    row = 0
    total = combined.length  # L + 1
    for item in items:
        rows = slice(row, row + item.state.batch)
        keep = item.state.length + 1
        for layer in part.layer_indices:
            source: Any = combined.cache.layers[layer]
            target: Any = item.state.cache.layers[layer]
            target.keys = source.keys[rows, :, total - keep:].contiguous()
            target.values = source.values[rows, :, total - keep:].contiguous()
        item.state.extend(item.state.step_mask())
        item.output = output[rows]
        row += item.state.batch


class StepBatcher:
    """Runs queued steps together: ``run_alone(item)`` for a lone step, ``run_many(items)`` for several."""

    def __init__(self, run_alone: Callable[[StepItem], None], run_many: Callable[[list[StepItem]], None]) -> None:
        self.run_alone, self.run_many = run_alone, run_many
        self.passes = 0  # trunk passes run, and the largest number of requests one pass held
        self.widest = 0
        self._queue: list[StepItem] = []
        self._running = False
        self._cond = threading.Condition()

    def submit(self, item: StepItem) -> torch.Tensor:
        with self._cond:
            self._queue.append(item)
            while item.output is None and item.error is None and self._running:
                self._cond.wait()
            if item.output is None and item.error is None:  # the trunk is idle: lead the next pass
                batch, self._queue, self._running = self._queue, [], True
            else:
                batch = []
        if batch:
            try:
                self.run_alone(batch[0]) if len(batch) == 1 else self.run_many(batch)
            except BaseException as exc:  # every request of the pass gets the error
                for other in batch:
                    other.error = exc
            finally:
                with self._cond:
                    self.passes += 1
                    self.widest = max(self.widest, len(batch))
                    self._running = False
                    self._cond.notify_all()
        if item.error is not None:
            raise item.error
        assert item.output is not None
        return item.output
