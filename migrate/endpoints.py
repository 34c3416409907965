"""Server endpoints: an IP address and a TCP port, parsed strictly.

``10.0.0.1:80`` and ``[2001:db8::1]:80`` are accepted; host names are not, because a name
would make every party's schedule depend on its resolver.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from migrate.errors import ConfigError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True, order=True)
class Endpoint:
    address: IPAddress
    port: int

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"port {self.port} is out of range 1..65535")

    def __str__(self) -> str:
        if self.address.version == 6:
            return f"[{self.address}]:{self.port}"
        return f"{self.address}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        """Parse ``IP:PORT`` (IPv6 in brackets)."""
        text = text.strip()
        if text.startswith("["):
            host, sep, port_text = text[1:].partition("]:")
        else:
            host, sep, port_text = text.rpartition(":")
        if not sep or not host or not port_text:
            raise ConfigError(f"endpoint {text!r} is not IP:PORT")
        return cls(parse_address(host, f"endpoint {text!r}"), parse_port(port_text, text))


def parse_address(text: str, what: str = "address") -> IPAddress:
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        raise ConfigError(f"{what}: {text!r} is not an IP address") from None


def parse_port(text: str, context: str = "") -> int:
    if not text.isdigit():
        where = f" in {context!r}" if context else ""
        raise ConfigError(f"port {text!r}{where} is not a number")
    port = int(text)
    if not 1 <= port <= 65535:
        raise ConfigError(f"port {port} is out of range 1..65535")
    return port


def parse_server_list(text: str) -> tuple[Endpoint, ...]:
    """Parse a comma-separated list of ``IP:PORT``; order matters (it is the schedule's)."""
    parts = list(text.split(","))
    if not text.strip() or any(not part.strip() for part in parts):
        raise ConfigError(f"server list {text!r} is empty or has an empty entry")
    servers = tuple(Endpoint.parse(part) for part in parts)
    if len(set(servers)) != len(servers):
        raise ConfigError(f"server list {text!r} names a server twice")
    return servers


def parse_address_and_port(text: str, default_port: int) -> Endpoint:
    """``IP``, ``IP:PORT``, ``IPv6`` or ``[IPv6]:PORT``; the port defaults to ``default_port``."""
    text = text.strip()
    has_port = text.startswith("[") or (text.count(":") == 1)
    if has_port:
        return Endpoint.parse(text)
    return Endpoint(parse_address(text), default_port)
