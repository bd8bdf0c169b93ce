"""Synchronous and semi-synchronous rounds (``[federation] round_mode``), as coordinator settings.

Cross-cloud training (arXiv 2503.12226) must not let one slow cloud stall every round. The
coordinator already ends a round at its deadline (``round_timeout_s``): the participants that have
not sent their update fail ("round timeout", their partial trunk step discarded, readmitted at the
next round) and the round aggregates the updates that arrived, if at least ``min_clients`` did.

    sync       the deadline is server.round_timeout_s (an hour by default: a safety net), and in
               sequential mode the participants take their trunk steps in round-robin turn
               (reproducible: a run with fixed seeds is deterministic and resumable exactly).
    semi_sync  the deadline is federation.round_deadline_s, and turns are off: a fast client takes
               its next step as soon as the trunk is free instead of waiting for a slow client's turn,
               so it can finish before the deadline. Which updates arrive in time depends on timing,
               so the run is no longer reproducible bit for bit.

A client still holds the trunk's lease from its FORWARD to its OPTIMIZER_STEP, so the round trips of
a client behind a slow link inside one step keep the trunk idle for the others (see docs/cross_cloud.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from fedsplit.config import RunConfig


@dataclass(frozen=True)
class RoundTiming:
    round_timeout_s: float  # a round aggregates what arrived this long after it started
    ordered_steps: bool  # round-robin trunk turns (sequential mode, sync rounds)


def round_timing(cfg: RunConfig) -> RoundTiming:
    sequential = cfg.server.mode == "sequential"
    if cfg.federation.round_mode == "sync":
        return RoundTiming(cfg.server.round_timeout_s, ordered_steps=sequential)
    return RoundTiming(cfg.federation.round_deadline_s or cfg.server.round_timeout_s, ordered_steps=False)
