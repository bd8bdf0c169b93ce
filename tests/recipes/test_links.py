"""Per-client links in ``fedsplit simulate``: ``[simulate.links.client-K]`` shapes client K's link only."""

from __future__ import annotations

import pytest

from fedsplit.config import RunConfig
from fedsplit.configio import ConfigError, load_config
from fedsplit.recipes.network import write_federation
from fedsplit.transport.shaping import LinkShape

RUN = """
[data]
num_clients = 4

[link]
latency_ms = 4
bandwidth_mbps = 80

[simulate.links.client-3]
latency_ms = 40
bandwidth_mbps = 8
jitter_ms = 2
"""


def test_only_the_named_client_gets_its_own_link(tmp_path):
    # Arrange
    (tmp_path / "run.toml").write_text(RUN)
    cfg = load_config(RunConfig, tmp_path / "run.toml")

    # Act
    _, client_tomls = write_federation(cfg, tmp_path / "fed")

    # Assert: client-3's process reads the slow link, the others [link]; no client file holds the table
    links = {path.stem: load_config(RunConfig, path) for path in client_tomls}
    assert links["client-3"].link == LinkShape(latency_ms=40.0, bandwidth_mbps=8.0, jitter_ms=2.0)
    for cid in ("client-0", "client-1", "client-2"):
        assert links[cid].link == LinkShape(latency_ms=4.0, bandwidth_mbps=80.0)
    assert all(c.simulate.links == {} for c in links.values())


def test_an_override_shapes_one_client_without_a_file():
    cfg = load_config(RunConfig, None, ["simulate.links.client-1.latency_ms=40",
                                        "simulate.links.client-1.bandwidth_mbps=8"])

    assert cfg.simulate.links == {"client-1": LinkShape(latency_ms=40.0, bandwidth_mbps=8.0)}
    assert not cfg.link.active  # the others stay unshaped


@pytest.mark.parametrize(("override", "message"), [
    ("simulate.links.slow.latency_ms=40", "expected client ids such as 'client-3' as keys, got 'slow'"),
    ("simulate.links.client-1.latency_ms=-5", "link.latency_ms: expected a finite number >= 0, got -5"),
    ("simulate.links.client-1.latency=5", "unknown key 'simulate.links.client-1.latency'"),
])
def test_a_bad_link_spec_is_refused_naming_it(override, message):
    with pytest.raises(ConfigError, match="simulate") as err:
        load_config(RunConfig, None, [override])

    assert message in str(err.value)


def test_a_link_for_a_client_the_run_does_not_have_is_refused_before_anything_is_written(tmp_path):
    cfg = load_config(RunConfig, None, ["data.num_clients=4", "simulate.links.client-4.latency_ms=40"])

    with pytest.raises(ValueError, match=r"expected client ids of this run \(client-0..client-3, "
                                         r"data.num_clients = 4\), got 'client-4'"):
        write_federation(cfg, tmp_path / "fed")
    assert not (tmp_path / "fed").exists()
