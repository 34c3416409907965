"""Ready-made topologies: the paper's Figure 2(a) and a switched server pool."""

from __future__ import annotations

import math
from ipaddress import IPv4Network

from labs.params import LinkParams
from labs.topo import DEFAULT_ADDRESS_POOL, Topo
from migrate.errors import ConfigError

MAX_POOL_HOSTS = 200  # one /24, with room for explicit addresses


def _check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_POOL_HOSTS:
        raise ConfigError(f"{name} must be an integer in [0, {MAX_POOL_HOSTS}], got {value!r}")
    return value


class PaperTopo(Topo):
    """Figure 2(a) of the paper: C and A behind R1, bottleneck R1-R2, S1 and S2 behind R2.

    ::

        c --+                +-- s1
            r1 ==========  r2
        a --+   bottleneck   +-- s2

    Every link runs at ``rate_mbit * scale`` (2 Mbit/s by default, as in the paper); ``scale``
    multiplies every rate so that experiments keep their proportions but run faster.
    """

    CLIENT = "c"
    ATTACKER = "a"
    ROUTERS = ("r1", "r2")
    SERVERS = ("s1", "s2")

    def __init__(
        self,
        scale: float = 1.0,
        rate_mbit: float = 2.0,
        *,
        address_pool: str | IPv4Network = DEFAULT_ADDRESS_POOL,
    ) -> None:
        if isinstance(scale, bool) or not isinstance(scale, int | float):
            raise ConfigError(f"scale must be a number, got {scale!r}")
        if not math.isfinite(scale) or scale <= 0:
            raise ConfigError(f"scale must be a positive number, got {scale!r}")
        super().__init__(address_pool=address_pool)
        self.scale = float(scale)
        # LinkParams validates the product, so a bad rate_mbit fails here, before any lab
        self.link_params = LinkParams(rate_mbit=_scaled(rate_mbit, scale))

    @property
    def bottleneck_mbit(self) -> float:
        assert self.link_params.rate_mbit is not None
        return self.link_params.rate_mbit

    def build(self) -> None:
        r1, r2 = (self.add_router(name) for name in self.ROUTERS)
        # Routers link first on each access segment, so they take the .1 addresses.
        for host in (self.CLIENT, self.ATTACKER):
            self.add_link(r1, self.add_host(host), self.link_params)
        self.add_link(r1, r2, self.link_params)
        for server in self.SERVERS:
            self.add_link(r2, self.add_host(server), self.link_params)


def _scaled(rate_mbit: float, scale: float) -> float:
    if isinstance(rate_mbit, bool) or not isinstance(rate_mbit, int | float):
        raise ConfigError(f"invalid link parameters: rate_mbit must be a number, got {rate_mbit!r}")
    return rate_mbit * scale


class PoolTopo(Topo):
    """A switched LAN for system tests: servers ``s1..sN``, clients ``c1..cM``, outsiders
    ``o1..oK`` (hosts that are not subscribed, e.g. attackers), all in one /24."""

    SWITCH = "lan"

    def __init__(
        self,
        servers: int = 2,
        clients: int = 1,
        outsiders: int = 0,
        *,
        params: LinkParams | None = None,
        subnet: str | IPv4Network | None = None,
        address_pool: str | IPv4Network = DEFAULT_ADDRESS_POOL,
    ) -> None:
        super().__init__(address_pool=address_pool)
        self.server_count = _check_count("servers", servers)
        self.client_count = _check_count("clients", clients)
        self.outsider_count = _check_count("outsiders", outsiders)
        total = self.server_count + self.client_count + self.outsider_count
        if not 1 <= total <= MAX_POOL_HOSTS:
            raise ConfigError(f"a pool needs 1 to {MAX_POOL_HOSTS} hosts, got {total}")
        if params is not None and not isinstance(params, LinkParams):
            raise ConfigError("params must be LinkParams")
        self.params = params
        self._subnet = subnet

    @property
    def servers(self) -> list[str]:
        return [f"s{i}" for i in range(1, self.server_count + 1)]

    @property
    def clients(self) -> list[str]:
        return [f"c{i}" for i in range(1, self.client_count + 1)]

    @property
    def outsiders(self) -> list[str]:
        return [f"o{i}" for i in range(1, self.outsider_count + 1)]

    def subnet(self) -> IPv4Network:
        """The LAN's subnet (allocated by the kit unless given)."""
        return self.subnet_of(self.SWITCH)

    def build(self) -> None:
        lan = self.add_switch(self.SWITCH, subnet=self._subnet)
        for name in self.servers + self.clients + self.outsiders:
            self.add_link(self.add_host(name), lan, self.params)
