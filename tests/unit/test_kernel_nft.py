"""Pure parts of the nftables adapter: names, scripts, error lines and JSON parsing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from migrate.errors import ConfigError
from migrate.kernel import nft


@given(role=st.from_regex(r"[a-z]{2,8}", fullmatch=True), pid=st.integers(1, 10**10 - 1))
def test_instance_table_names_round_trip(role: str, pid: int) -> None:
    name = nft.instance_table_name(role, pid)
    assert name == f"roam_{role}_{pid}"
    assert nft.parse_instance_table_name(name) == (role, pid)
    assert nft.check_identifier(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "roam_4711_3f9a",  # a lab table: not an instance table
        "roam_srv_0",
        "roam_srv_012",
        "roam_srv_",
        "roam_SRV_12",
        "roam_srv_12_x",
        "xroam_srv_12",
        "roam_s_12",
        "filter",
    ],
)
def test_other_names_are_not_instance_tables(name: str) -> None:
    assert nft.parse_instance_table_name(name) is None


@pytest.mark.parametrize(
    ("role", "pid"), [("S", 1), ("srv1", 1), ("x", 1), ("srv", 0), ("srv", -3)]
)
def test_invalid_roles_and_pids_are_refused(role: str, pid: int) -> None:
    with pytest.raises(ConfigError):
        nft.instance_table_name(role, pid)


def test_replace_script_is_one_transaction_that_also_creates() -> None:
    script = nft.replace_table_script("inet", "roam_srv_1", "\n  set s { type ipv4_addr; }\n")
    assert script == (
        "add table inet roam_srv_1\n"
        "delete table inet roam_srv_1\n"
        "table inet roam_srv_1 {\n  set s { type ipv4_addr; }\n}\n"
    )
    assert nft.delete_table_script("ip", "t") == "add table ip t\ndelete table ip t\n"


@pytest.mark.parametrize(("family", "name"), [("inet", "a b"), ("inet", "t;flush"), ("foo", "t")])
def test_scripts_refuse_unsafe_names(family: str, name: str) -> None:
    with pytest.raises(ConfigError):
        nft.replace_table_script(family, name, "")


def test_first_error_line() -> None:
    stderr = (
        "/dev/stdin:7:69-69: Error: syntax error, unexpected '}'\n"
        "  chain in { junk }\n"
        "                  ^\n"
        "/dev/stdin:9:1-1: Error: syntax error, unexpected end of file\n"
    )
    assert nft.first_error(stderr) == "syntax error, unexpected '}' (script line 7)"
    assert (
        nft.first_error("Error: Could not process rule: No such file or directory\nx\n")
        == "Could not process rule: No such file or directory"
    )
    assert nft.first_error("\nsomething odd\n") == "something odd"
    assert nft.first_error("") == "no error message"


LISTING = [
    {"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
    {"table": {"family": "inet", "name": "t", "handle": 1}},
    {"counter": {"family": "inet", "name": "drops", "table": "t", "packets": 3, "bytes": 180}},
    {"set": {"family": "inet", "name": "plain", "table": "t", "elem": ["10.0.0.1", "10.0.0.2"]}},
    {"set": {"family": "inet", "name": "empty", "table": "t"}},
    {
        "set": {
            "name": "mixed",
            "elem": [
                {"concat": ["10.0.0.1", 80]},
                {"prefix": {"addr": "10.1.0.0", "len": 16}},
                {"range": ["10.2.0.1", "10.2.0.9"]},
                {"elem": {"val": "10.3.0.1", "timeout": 30}},
            ],
        }
    },
    {"map": {"name": "vip", "elem": [[{"concat": ["10.9.9.9", 80]}, "10.0.0.1"]]}},
]


def test_json_parsing() -> None:
    assert nft.parse_tables(LISTING) == [("inet", "t")]
    assert nft.parse_counters(LISTING) == {"drops": (3, 180)}
    assert nft.parse_set_elements(LISTING, "plain") == ["10.0.0.1", "10.0.0.2"]
    assert nft.parse_set_elements(LISTING, "empty") == []
    assert nft.parse_set_elements(LISTING, "mixed") == [
        ("10.0.0.1", 80),
        "10.1.0.0/16",
        "10.2.0.1-10.2.0.9",
        "10.3.0.1",
    ]
    assert nft.parse_map_elements(LISTING, "vip") == {("10.9.9.9", 80): "10.0.0.1"}
    with pytest.raises(nft.NftError, match="no set named nope"):
        nft.parse_set_elements(LISTING, "nope")
    with pytest.raises(nft.NftError):
        nft.normalize_value({"unknown": 1})
