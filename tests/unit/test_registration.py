import ipaddress
import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migrate.endpoints import parse_server_list
from migrate.errors import AuthenticationError, ConfigError, MalformedMessageError
from migrate.hashchain import KeyChain
from migrate.registration import (
    Bundle,
    ClientList,
    ClientRecord,
    Deployment,
    DeploymentSecret,
    fingerprint,
)
from migrate.schedule import MSchedule


def deployment(**changes) -> Deployment:
    fields = {
        "deployment_id": bytes(range(16)),
        "servers": parse_server_list("10.0.0.1:80,10.0.0.2:80"),
        "vip": ipaddress.ip_address("10.99.0.1"),
        "service_port": 80,
        "chain_length": 1000,
        "m": MSchedule(5, ((10, 7),)),
        "tick": 0.5,
        "start": 1_700_000_000.0,
        "delta": 0.1,
        "gamma": 0.2,
    }
    fields.update(changes)
    return Deployment(**fields)


SECRET = DeploymentSecret(bytes(range(16)), bytes(range(32)), bytes(range(32, 64)))


def client(name="alice", client_id=1, **changes) -> ClientRecord:
    fields = {
        "name": name,
        "client_id": client_id,
        "address": ipaddress.ip_address("10.0.0.50"),
        "roaming_port": 47474,
        "channel_key": os.urandom(32),
        "until_epoch": 100,
    }
    fields.update(changes)
    return ClientRecord(**fields)


def test_deployment_roundtrip_and_strictness():
    original = deployment()
    assert Deployment.decode(original.encode()) == original
    document = json.loads(original.encode())
    document["extra"] = 1
    with pytest.raises(ConfigError, match="unknown field"):
        Deployment.decode(json.dumps(document).encode())
    del document["extra"]
    document["tick"] = "fast"
    with pytest.raises(ConfigError, match="'tick' must be a number"):
        Deployment.decode(json.dumps(document).encode())
    document["tick"] = 0.5
    del document["vip"]
    with pytest.raises(ConfigError, match="missing field 'vip'"):
        Deployment.decode(json.dumps(document).encode())
    with pytest.raises(ConfigError, match="not valid JSON"):
        Deployment.decode(b"{")
    with pytest.raises(ConfigError, match="expected a server-roaming/deployment"):
        Deployment.decode(SECRET.encode())


def test_deployment_validation():
    with pytest.raises(ConfigError, match="VIP"):
        deployment(vip=ipaddress.ip_address("10.0.0.1"))
    with pytest.raises(ConfigError, match="IP version"):
        deployment(vip=ipaddress.ip_address("fd00::1"))
    with pytest.raises(ConfigError, match="tick"):
        deployment(tick=-1.0)


def test_secret_roundtrip_and_repr_hides_keys():
    assert DeploymentSecret.decode(SECRET.encode()) == SECRET
    assert SECRET.chain_key.hex() not in repr(SECRET)
    assert DeploymentSecret.from_bytes(SECRET.deployment_id, SECRET.to_bytes()) == SECRET


def test_client_list_sealing():
    clients = ClientList().add(client()).add(client("bob", 2))
    sealed = clients.seal(SECRET, os.urandom)
    assert ClientList.open(sealed, SECRET) == clients
    assert b"alice" not in sealed
    other = DeploymentSecret(SECRET.deployment_id, SECRET.chain_key, bytes(32))
    with pytest.raises(AuthenticationError):
        ClientList.open(sealed, other)
    for position in (0, 6, len(sealed) // 2, len(sealed) - 1):
        tampered = bytearray(sealed)
        tampered[position] ^= 0x40
        with pytest.raises((AuthenticationError, MalformedMessageError)):
            ClientList.open(bytes(tampered), SECRET)
    with pytest.raises(MalformedMessageError):
        ClientList.open(sealed[:20], SECRET)


def test_client_list_rules():
    clients = ClientList().add(client())
    with pytest.raises(ConfigError, match="already subscribed"):
        clients.add(client(client_id=2))
    revoked = clients.revoke("alice")
    assert revoked.by_name("alice").revoked
    assert revoked.generation == clients.generation + 1
    with pytest.raises(ConfigError, match="already revoked"):
        revoked.revoke("alice")
    with pytest.raises(ConfigError, match="no client named"):
        clients.revoke("mallory")
    assert clients.next_client_id() == 2


def test_grant_policy():
    fixed = client(until_epoch=100)
    assert fixed.grant_for(50, 1000) == 100
    leased = client(until_epoch=100, lease_epochs=20, expires_epoch=500)
    assert leased.grant_for(50, 1000) == 100
    assert leased.grant_for(200, 1000) == 220
    assert leased.grant_for(490, 1000) == 500
    assert client(until_epoch=100, lease_epochs=20).grant_for(990, 1000) == 1000
    revoked = client(until_epoch=100, lease_epochs=20, revoked=True)
    assert revoked.grant_for(200, 1000) == 100


@pytest.mark.parametrize("name", ["", "-x", "a b", "x" * 65, "ü"])
def test_bad_client_names(name):
    with pytest.raises(ConfigError, match="client name"):
        client(name=name)


def test_bundle_issue_and_roundtrip():
    dep = deployment()
    record = client(until_epoch=300)
    bundle = Bundle.issue(dep, SECRET, record, os.urandom)
    assert Bundle.decode(bundle.encode()) == bundle
    assert bundle.servers() == dep.servers
    assert bundle.chain_key == KeyChain(SECRET.chain_key, 1000).key(300)
    assert bundle.channel_key == record.channel_key
    assert SECRET.chain_key.hex() not in bundle.encode().decode()
    assert SECRET.group_key.hex() not in bundle.encode().decode()
    assert "10.0.0.1" not in bundle.encode().decode()  # the server list is sealed
    assert bundle.channel_key.hex() not in repr(bundle)


def test_sealed_server_list_is_bound_to_the_client():
    bundle = Bundle.issue(deployment(), SECRET, client(), os.urandom)
    document = json.loads(bundle.encode())
    document["name"] = "mallory"
    with pytest.raises(AuthenticationError):
        Bundle.decode(json.dumps(document).encode()).servers()


@settings(max_examples=200, deadline=None)
@given(position=st.integers(min_value=0), value=st.integers(0, 255))
def test_corrupted_bundles_fail_cleanly(position, value):
    data = bytearray(Bundle.issue(deployment(), SECRET, client(), os.urandom).encode())
    position %= len(data)
    if data[position] == value:
        return
    data[position] = value
    try:
        bundle = Bundle.decode(bytes(data))
        bundle.servers()
    except (ConfigError, AuthenticationError, MalformedMessageError):
        pass


def test_fingerprint_is_stable_and_short():
    assert fingerprint(b"k" * 32) == fingerprint(b"k" * 32)
    assert len(fingerprint(b"k" * 32)) == 16


@settings(max_examples=50, deadline=None)
@given(
    entries=st.lists(
        st.tuples(st.integers(1, 6), st.sampled_from(["10.0.0.1", "10.0.0.2", "fd00::1"])),
        max_size=12,
    ),
    revoke=st.integers(0, 12),
)
def test_a_client_list_finds_by_id_and_address_as_a_scan_does(entries, revoke):
    """``by_id`` and ``by_address`` look up indexes built with the list (every datagram and
    every connection asks): the same answers as a scan, in the same order, after any change."""
    clients = ClientList()
    for number, (client_id, address) in enumerate(entries):
        record = client(f"c{number}", client_id, address=ipaddress.ip_address(address))
        try:
            clients = clients.add(record)
        except ConfigError:
            continue  # an id in use: refused, the list unchanged
    if clients.clients and revoke < len(clients.clients):
        clients = clients.revoke(clients.clients[revoke].name)
    for client_id in range(0, 8):
        scan = next((c for c in clients.clients if c.client_id == client_id), None)
        assert clients.by_id(client_id) == scan
    for address in ("10.0.0.1", "10.0.0.2", "fd00::1", "10.0.0.9"):
        ip = ipaddress.ip_address(address)
        assert clients.by_address(ip) == [c for c in clients.clients if c.address == ip]
