"""Measure a shaped link: the kit checking itself (``roam lab linkcheck``).

A two-host lab with one link shaped as asked; throughput is iperf3 TCP from ``a`` to ``b``
(the first second, slow start, is omitted), loss is a UDP probe of ``probes`` numbered datagrams
from ``a`` to ``b`` (``labs/udp_probe.py``), so it measures one direction, which is what
``loss_pct`` configures. With loss configured, the TCP figure is what TCP achieves through that
loss, not the configured rate.
"""

from __future__ import annotations

from dataclasses import dataclass

from labs.clients import iperf3, probe_interval_s, udp_loss_probe
from labs.lab import Lab
from labs.params import LinkParams
from labs.services import start_iperf3_server
from labs.topo import Topo
from migrate.errors import ConfigError

PROBE_BYTES = 200
MAX_PROBE_MBIT = 5.0


class LinkTopo(Topo):
    """Two hosts, ``a`` and ``b``, one link shaped by ``params`` in both directions."""

    def __init__(self, params: LinkParams) -> None:
        super().__init__()
        self.params = params

    def build(self) -> None:
        self.add_link(self.add_host("a"), self.add_host("b"), self.params)


@dataclass(frozen=True)
class LinkCheck:
    configured_mbit: float
    measured_mbit: float
    configured_loss_pct: float
    measured_loss_pct: float
    probes: int

    def as_json(self) -> dict[str, float]:
        return {
            "configured_mbit": self.configured_mbit,
            "measured_mbit": round(self.measured_mbit, 3),
            "configured_loss_pct": self.configured_loss_pct,
            "measured_loss_pct": round(self.measured_loss_pct, 3),
        }


def check_link(
    rate_mbit: float, loss_pct: float = 0.0, *, duration_s: float = 3.0, probes: int = 3000
) -> LinkCheck:
    """Build the lab, measure, remove the lab."""
    params = LinkParams(rate_mbit=rate_mbit, loss_pct=loss_pct)
    if not 0.5 <= duration_s <= 60:
        raise ConfigError(f"duration must be in [0.5, 60] s, got {duration_s!r}")
    if not 100 <= probes <= 100_000:
        raise ConfigError(f"probes must be in [100, 100000], got {probes!r}")
    probe_mbit = min(rate_mbit / 2, MAX_PROBE_MBIT)
    with Lab(LinkTopo(params)) as lab:
        a, b = lab["a"], lab["b"]
        with start_iperf3_server(b):
            tcp = iperf3(a, b.address, duration_s=duration_s, omit_s=1.0)
        # half the rate (at most 5 Mbit/s) keeps the queue empty: every loss is the rule's
        probe = udp_loss_probe(
            a,
            b,
            count=probes,
            size_bytes=PROBE_BYTES,
            interval_s=probe_interval_s(probe_mbit, PROBE_BYTES),
        )
    return LinkCheck(
        configured_mbit=rate_mbit,
        measured_mbit=tcp.received_mbit,
        configured_loss_pct=loss_pct,
        measured_loss_pct=probe.loss_pct,
        probes=probe.sent,
    )
