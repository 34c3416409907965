"""Element changes over netlink (``migrate.kernel.nftsets``, the client's freeze and switch)
leave a table exactly as the same changes written as an nft script do, and a change the
kernel refuses applies nothing."""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable

import pytest

from client_shim.rules import (
    freeze_changes,
    hold_changes,
    rewrite_table_body,
    switch_changes,
    table_family,
)
from migrate.endpoints import Endpoint, IPAddress
from migrate.kernel import nft
from migrate.kernel.instances import call_in_netns
from migrate.kernel.nftsets import Add, Change, Element, Flush, script, service

pytestmark = pytest.mark.system

SETS = ("current", "frozen", "syn_hold", "finished", "fresh", "pool")
MAPS = ("addr_out", "port_out", "syn_addr", "syn_port")


def endpoint(address: str, port: int) -> Endpoint:
    return Endpoint(ipaddress.ip_address(address), port)


def client_tables(netns: str, vip: IPAddress, servers: tuple[Endpoint, ...]) -> str:
    """Two alike client tables in ``netns``, live mode with the hold: ``by_netlink`` and
    ``by_script``; their family."""
    family = table_family(vip)
    body = rewrite_table_body(vip, 80, servers, servers[0], nflog_group=7, hold_mark=0x10)
    for table in ("by_netlink", "by_script"):
        nft.replace_table(family, table, body, netns=netns)
    return family


def contents(netns: str, family: str, table: str) -> dict[str, object]:
    found: dict[str, object] = {}
    for name in SETS:
        found[name] = sorted(map(str, nft.set_elements(family, table, name, netns=netns)))
    found.update({m: nft.map_elements(family, table, m, netns=netns) for m in MAPS})
    return found


STEPS: list[tuple[str, Callable[[IPAddress, Endpoint], list[Change]]]] = [
    ("hold", lambda vip, new: hold_changes(80)),
    ("freeze", lambda vip, new: freeze_changes(vip, 80, [40000, 40002, 65535], new)),
    ("switch", lambda vip, new: switch_changes(vip, 80, new, [40003], [40001, 1])),
    ("plain switch", lambda vip, new: switch_changes(vip, 80, new)),
    ("empty freeze", lambda vip, new: freeze_changes(vip, 80, [], new)),
]


@pytest.mark.parametrize(
    ("vip", "servers"),
    [
        ("10.9.0.100", ("10.9.1.1", "10.9.1.2")),
        ("fd00:9::64", ("fd00:9::1:1", "fd00:9::1:2")),
    ],
)
def test_the_netlink_changes_leave_the_table_as_the_script_does(
    netns: str, vip: str, servers: tuple[str, str]
) -> None:
    address = ipaddress.ip_address(vip)
    pool = (endpoint(servers[0], 8000), endpoint(servers[1], 8001))
    family = client_tables(netns, address, pool)
    for name, step in STEPS:
        for new in (pool[1], pool[0]):
            changes = step(address, new)
            call_in_netns(
                netns, functools.partial(nft.apply_changes, family, "by_netlink", changes)
            )
            nft.apply(script(family, "by_script", changes), netns=netns)
            by_netlink = contents(netns, family, "by_netlink")
            assert by_netlink == contents(netns, family, "by_script"), name
    # The last step pointed everything back at the first server: the maps say so.
    assert by_netlink["addr_out"] == {vip: servers[0]}
    assert by_netlink["frozen"] == []


def test_a_thousand_ports_frozen_in_one_transaction(netns: str) -> None:
    vip = ipaddress.ip_address("10.9.0.100")
    pool = (endpoint("10.9.1.1", 8000), endpoint("10.9.1.2", 8001))
    family = client_tables(netns, vip, pool)
    ports = list(range(30000, 31000))
    changes = freeze_changes(vip, 80, ports, pool[1])
    call_in_netns(netns, lambda: nft.apply_changes(family, "by_netlink", changes))
    frozen = nft.set_elements(family, "by_netlink", "frozen", netns=netns)
    assert sorted(frozen) == ports  # type: ignore[type-var]


def test_a_refused_change_applies_nothing(netns: str) -> None:
    """One bad change in the batch (a set the table lacks): the kernel refuses the whole
    transaction, the error names the table and the reason, and the flush before it did not
    happen."""
    vip = ipaddress.ip_address("10.9.0.100")
    pool = (endpoint("10.9.1.1", 8000), endpoint("10.9.1.2", 8001))
    family = client_tables(netns, vip, pool)
    frozen = [Add("frozen", (Element("40000", service(40000)),))]
    call_in_netns(netns, lambda: nft.apply_changes(family, "by_netlink", frozen))
    bad = [Flush("set", "frozen"), Add("no_such_set", (Element("1", service(1)),))]
    with pytest.raises(
        nft.NftError,
        match=r"in table ip by_netlink: adding to no_such_set: No such file or directory",
    ):
        call_in_netns(netns, lambda: nft.apply_changes(family, "by_netlink", bad))
    assert nft.set_elements(family, "by_netlink", "frozen", netns=netns) == [40000]
    # A table that is not there: the same, one line.
    with pytest.raises(
        nft.NftError, match=r"in table ip no_table: adding to frozen: No such file or directory"
    ):
        call_in_netns(netns, lambda: nft.apply_changes(family, "no_table", frozen))
    # And the writer goes on working after the refusals.
    call_in_netns(netns, lambda: nft.apply_changes(family, "by_netlink", [Flush("set", "frozen")]))
    assert nft.set_elements(family, "by_netlink", "frozen", netns=netns) == []
