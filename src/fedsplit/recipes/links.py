"""Per-client links in ``fedsplit simulate``: which client runs behind which shaped link.

Cross-cloud federation (arXiv 2503.12226) joins clouds behind links of very different speed. On one
machine ``[link]`` shapes every simulated client alike; ``[simulate.links.client-K]`` gives client K
a link of its own (:class:`fedsplit.transport.shaping.LinkShape`), e.g. one cloud ten times slower::

    [link]                          # every client
    latency_ms = 4
    bandwidth_mbps = 80

    [simulate.links.client-3]       # client-3 instead
    latency_ms = 40
    bandwidth_mbps = 8

or on the command line ``--set simulate.links.client-3.latency_ms=40``. Each client's own TOML then
holds its link in ``[link]`` and nothing of the others'.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from fedsplit.config import RunConfig, SimulateConfig
from fedsplit.transport.shaping import LinkShape


def client_links(cfg: RunConfig, clients: Sequence[str]) -> dict[str, LinkShape]:
    """Each client's link: its ``[simulate.links.<id>]`` entry, else ``[link]``.

    An entry naming a client the run does not have is an error (a typo would silently shape nobody).
    """
    unknown = sorted(set(cfg.simulate.links) - set(clients))
    if unknown:
        known = f"{clients[0]}..{clients[-1]}" if clients else "none"
        raise ValueError(f"simulate.links: expected client ids of this run ({known}, data.num_clients = "
                         f"{len(clients)}), got {', '.join(repr(k) for k in unknown)}")
    return {cid: cfg.simulate.links.get(cid, cfg.link) for cid in clients}


def client_config(cfg: RunConfig, link: LinkShape) -> RunConfig:
    """``cfg`` as one client's process reads it: ``link`` as its ``[link]``, no per-client table."""
    return replace(cfg, link=link, simulate=SimulateConfig())
