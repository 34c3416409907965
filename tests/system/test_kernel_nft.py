"""The nftables adapter against the real nft, in a namespace of our own (``roamk<pid>n<n>``)."""

from __future__ import annotations

import subprocess

import pytest

from migrate.errors import ConfigError
from migrate.kernel import nft

pytestmark = pytest.mark.system

TABLE = "roam_srv_4242"
BODY = """
    counter gate_drops { }
    set clients { type ipv4_addr; elements = { 10.0.0.1, 10.0.0.2 } }
    set pairs { type ipv4_addr . inet_service; elements = { 10.0.0.1 . 80 } }
    set nets { type ipv4_addr; flags interval; elements = { 10.1.0.0/16 } }
    map vip { type ipv4_addr . inet_service : ipv4_addr; elements = { 10.9.9.9 . 80 : 10.0.0.1 } }
    chain input {
        type filter hook input priority 0; policy accept;
        tcp dport 9 counter name gate_drops drop
    }
"""


def test_nft_is_available() -> None:
    assert nft.nft_available() is None


def test_replace_reads_and_deletes_a_table(netns: str) -> None:
    assert nft.list_tables(netns=netns) == []
    nft.replace_table("inet", TABLE, BODY, netns=netns)  # first apply: the table did not exist
    assert nft.list_tables(netns=netns) == [("inet", TABLE)]
    assert nft.counters("inet", TABLE, netns=netns) == {"gate_drops": (0, 0)}
    assert nft.set_elements("inet", TABLE, "clients", netns=netns) == ["10.0.0.1", "10.0.0.2"]
    assert nft.set_elements("inet", TABLE, "pairs", netns=netns) == [("10.0.0.1", 80)]
    assert nft.set_elements("inet", TABLE, "nets", netns=netns) == ["10.1.0.0/16"]
    assert nft.map_elements("inet", TABLE, "vip", netns=netns) == {("10.9.9.9", 80): "10.0.0.1"}
    assert any("table" in item for item in nft.table_json("inet", TABLE, netns=netns))

    # a second replace swaps the whole contents at once
    nft.replace_table("inet", TABLE, "set clients { type ipv4_addr; }", netns=netns)
    assert nft.set_elements("inet", TABLE, "clients", netns=netns) == []
    assert nft.counters("inet", TABLE, netns=netns) == {}

    assert nft.delete_table("inet", TABLE, netns=netns) is True
    assert nft.delete_table("inet", TABLE, netns=netns) is False
    with pytest.raises(nft.NftError, match="deleting table inet roam_srv_4242"):
        nft.delete_table("inet", TABLE, missing_ok=False, netns=netns)
    assert nft.list_tables(netns=netns) == []


def test_a_broken_script_changes_nothing(netns: str) -> None:
    nft.replace_table("inet", TABLE, BODY, netns=netns)
    before = nft.table_json("inet", TABLE, netns=netns)
    broken_syntax = BODY + "\n    chain broken { this is not nft }\n"
    with pytest.raises(nft.NftError, match=r"replacing table inet roam_srv_4242: .*script line"):
        nft.replace_table("inet", TABLE, broken_syntax, netns=netns)
    # valid syntax, but refers to a set that does not exist: the kernel aborts the transaction
    # after "delete table" was already queued; the old table must survive untouched
    broken_reference = BODY + "\n    chain other { ip saddr @missing drop\n    }\n"
    with pytest.raises(nft.NftError, match="replacing table inet roam_srv_4242"):
        nft.replace_table("inet", TABLE, broken_reference, netns=netns)
    assert nft.table_json("inet", TABLE, netns=netns) == before
    nft.delete_table("inet", TABLE, netns=netns)


def test_path_and_name_address_the_same_namespace(netns: str) -> None:
    nft.replace_table("ip", "roam_cli_4242", "", netns=netns)
    assert nft.list_tables(netns=f"/run/netns/{netns}") == [("ip", "roam_cli_4242")]
    assert ("ip", "roam_cli_4242") not in nft.list_tables()
    nft.delete_table("ip", "roam_cli_4242", netns=f"/run/netns/{netns}")
    assert nft.list_tables(netns=netns) == []


def test_invalid_names_never_reach_nft() -> None:
    with pytest.raises(ConfigError):
        nft.replace_table("inet", "x; flush ruleset", "")
    with pytest.raises(ConfigError):
        nft.delete_table("ipx", "t")


IN_PROCESS = """
import sys
from migrate.kernel import libnft, nft
body, table = sys.argv[1], sys.argv[2]
assert libnft.available(), "libnftables not found"
nft.replace_table("inet", table, body)
before = nft.table_json("inet", table)
try:
    nft.replace_table("inet", table, body + "\\n    chain broken { this is not nft }\\n")
except nft.NftError as error:
    print(error)
else:
    raise SystemExit("a broken script was accepted")
assert nft.table_json("inet", table) == before, "the broken script changed the table"
nft.delete_table("inet", table)
"""


def test_in_process_libnftables_is_one_transaction_and_names_the_line(netns: str) -> None:
    # The shims change rules through libnftables in their own namespace (no program started
    # inside a hand-over's pause): same transaction, same error as ``nft -f -``.
    result = subprocess.run(
        ["ip", "netns", "exec", netns, "python3", "-c", IN_PROCESS, BODY, TABLE],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    with pytest.raises(nft.NftError) as by_program:
        nft.replace_table(
            "inet", TABLE, BODY + "\n    chain broken { this is not nft }\n", netns=netns
        )
    assert "script line" in str(by_program.value)
    assert result.stdout.strip() == str(by_program.value)
    assert nft.list_tables(netns=netns) == []
