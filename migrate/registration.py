"""Offline registration: the deployment, its secrets, the client list and client bundles.

Theory of operation: ``roam init`` draws the chain key ``K_n`` and the group key (paper
section III: in the paper a threshold group key held by servers and firewalls; here one secret
that ``migrate.shamir`` can split). ``roam subscribe`` gives each client a channel key ``K_C``
and the chain key ``K_t`` of the last epoch it may follow, and adds it to the *legitimate-client
list*, which is sealed with a key derived from the group key so that only the server pool can
read or change it. The client's *bundle* carries ``K_C``, ``K_t``, the VIP and the server list
sealed with ``K_C``.

This module only turns these objects into bytes and back (strictly) and seals them; reading
and writing files, with their permissions, is the CLI's job.
"""

from __future__ import annotations

import base64
import hashlib
import re
import struct
from dataclasses import dataclass, field, replace

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from migrate.activeset import check_active
from migrate.chainindex import open_index, seal_index
from migrate.channel import Purpose, Random, derive_key
from migrate.endpoints import Endpoint, IPAddress, parse_address
from migrate.errors import AuthenticationError, ConfigError, MalformedMessageError
from migrate.hashchain import (
    DEFAULT_INDEX_SPACING,
    KEY_BYTES,
    MAX_CHAIN_LENGTH,
    KeyChain,
    PebbleIndex,
    Progress,
    build_index,
)
from migrate.schedule import MSchedule, ScheduleParams, index_units, m_tag
from migrate.strictjson import Fields, dump_object, parse_object

DEPLOYMENT_FORMAT = "server-roaming/deployment"
SECRET_FORMAT = "server-roaming/secret"
BUNDLE_FORMAT = "server-roaming/bundle"
FORMAT_VERSION = 1
DEPLOYMENT_ID_BYTES = 16
DEFAULT_ROAMING_PORT = 47474
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAX_CLIENT_ID = 0xFFFF_FFFE


def fingerprint(secret: bytes) -> str:
    """A short, one-way name for a secret, safe to print."""
    return hashlib.sha256(b"server-roaming fingerprint\x00" + secret).hexdigest()[:16]


def check_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise ConfigError(
            f"client name {name!r} must be 1-64 characters of letters, digits, '.', '_' or '-'"
        )
    return name


def _m_to_json(m: MSchedule) -> dict[str, int]:
    return {str(epoch): value for epoch, value in m.as_mapping().items()}


def _m_from_json(fields: Fields, name: str) -> MSchedule:
    raw = fields.object(name)
    mapping: dict[int, int] = {}
    for key in raw.names():
        if not key.isdigit():
            raise ConfigError(f"m schedule key {key!r} is not an epoch number")
        mapping[int(key)] = raw.integer(key)
    raw.done()
    return MSchedule.from_mapping(mapping)


# --- deployment ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Deployment:
    """Public parameters every server and client agrees on."""

    deployment_id: bytes
    servers: tuple[Endpoint, ...]
    vip: IPAddress
    service_port: int
    chain_length: int
    m: MSchedule
    tick: float
    start: float
    delta: float
    gamma: float
    #: k of PROTOCOL.md section 4: servers active in every epoch. Stored only when not 1, so
    #: a deployment without the field (every one made before k of N) means 1.
    active: int = 1

    def __post_init__(self) -> None:
        if len(self.deployment_id) != DEPLOYMENT_ID_BYTES:
            raise ConfigError("deployment id must be 16 bytes")
        if not 1 <= self.chain_length <= MAX_CHAIN_LENGTH:
            raise ConfigError(f"chain length must be in 1..{MAX_CHAIN_LENGTH}")
        if not 1 <= self.service_port <= 65535:
            raise ConfigError(f"service port {self.service_port} is out of range")
        if any(server.address == self.vip for server in self.servers):
            raise ConfigError(f"the VIP {self.vip} must not be a server's own address")
        if any(server.address.version != self.vip.version for server in self.servers):
            raise ConfigError("the VIP and the servers must use the same IP version")
        self.schedule_params()  # validates tick, start, delta, gamma, servers
        check_active(self.active, len(self.servers))

    def schedule_params(self) -> ScheduleParams:
        return ScheduleParams(self.servers, self.tick, self.start, self.m, self.delta, self.gamma)

    def encode(self) -> bytes:
        return dump_object(
            DEPLOYMENT_FORMAT,
            FORMAT_VERSION,
            {
                "deployment_id": self.deployment_id.hex(),
                "servers": [str(server) for server in self.servers],
                "vip": str(self.vip),
                "service_port": self.service_port,
                "chain_length": self.chain_length,
                "m": _m_to_json(self.m),
                "tick": self.tick,
                "start": self.start,
                "delta": self.delta,
                "gamma": self.gamma,
                **_active_to_json(self.active),
            },
        )

    @classmethod
    def decode(cls, data: bytes) -> Deployment:
        fields = parse_object(data, DEPLOYMENT_FORMAT, FORMAT_VERSION)
        servers = tuple(Endpoint.parse(text) for text in fields.list_of_strings("servers"))
        if not servers:
            raise ConfigError("deployment: the server list is empty")
        deployment = cls(
            deployment_id=fields.hex_bytes("deployment_id", DEPLOYMENT_ID_BYTES),
            servers=servers,
            vip=parse_address(fields.string("vip"), "deployment vip"),
            service_port=fields.integer("service_port", 1, 65535),
            chain_length=fields.integer("chain_length", 1, MAX_CHAIN_LENGTH),
            m=_m_from_json(fields, "m"),
            tick=fields.number("tick"),
            start=fields.number("start"),
            delta=fields.number("delta"),
            gamma=fields.number("gamma"),
            active=_active_from_json(fields),
        )
        fields.done()
        return deployment


@dataclass(frozen=True, slots=True)
class DeploymentSecret:
    """``K_n`` and the group key. Never printed; stored 0600."""

    deployment_id: bytes
    chain_key: bytes
    group_key: bytes
    #: The pebble index of the chain below ``K_n`` if one was opened (never encoded here: it
    #: lives sealed in its own file, ``migrate.chainindex``); it makes ``chain()`` start fast.
    chain_index: PebbleIndex | None = field(default=None, compare=False)

    def __repr__(self) -> str:
        return f"DeploymentSecret(deployment_id={self.deployment_id.hex()}, <secret>)"

    @classmethod
    def generate(cls, deployment_id: bytes, random: Random) -> DeploymentSecret:
        return cls(deployment_id, random(KEY_BYTES), random(KEY_BYTES))

    def to_bytes(self) -> bytes:
        """The 64 bytes a threshold split protects: ``K_n || group key``."""
        return self.chain_key + self.group_key

    @classmethod
    def from_bytes(cls, deployment_id: bytes, data: bytes) -> DeploymentSecret:
        if len(data) != 2 * KEY_BYTES:
            raise ConfigError("a deployment secret is 64 bytes")
        return cls(deployment_id, data[:KEY_BYTES], data[KEY_BYTES:])

    def chain(self, chain_length: int) -> KeyChain:
        index = self.chain_index
        if index is not None and index.top != chain_length:
            index = None  # built for another length: correct without it, only slower to start
        return KeyChain(self.chain_key, chain_length, index)

    def encode(self) -> bytes:
        return dump_object(
            SECRET_FORMAT,
            FORMAT_VERSION,
            {
                "deployment_id": self.deployment_id.hex(),
                "chain_key": self.chain_key.hex(),
                "group_key": self.group_key.hex(),
            },
        )

    @classmethod
    def decode(cls, data: bytes) -> DeploymentSecret:
        fields = parse_object(data, SECRET_FORMAT, FORMAT_VERSION)
        secret = cls(
            fields.hex_bytes("deployment_id", DEPLOYMENT_ID_BYTES),
            fields.hex_bytes("chain_key", KEY_BYTES),
            fields.hex_bytes("group_key", KEY_BYTES),
        )
        fields.done()
        return secret


# --- clients ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientRecord:
    """One legitimate client, as the server pool knows it.

    ``until_epoch`` is the key index granted at subscription. ``lease_epochs`` > 0 lets the
    pool extend the client online so that it always holds keys ``lease_epochs`` past the
    current epoch, never past ``expires_epoch`` (its trust level, paper section I).
    ``rate_kbit`` is its QoS contract (0: none).
    """

    name: str
    client_id: int
    address: IPAddress
    roaming_port: int
    channel_key: bytes
    until_epoch: int
    lease_epochs: int = 0
    expires_epoch: int = 0
    rate_kbit: int = 0
    revoked: bool = False

    def __post_init__(self) -> None:
        check_name(self.name)
        if not 1 <= self.client_id <= MAX_CLIENT_ID:
            raise ConfigError(f"client id {self.client_id} is out of range")
        if not 1 <= self.roaming_port <= 65535:
            raise ConfigError(f"roaming port {self.roaming_port} is out of range")
        if len(self.channel_key) != KEY_BYTES:
            raise ConfigError("a client channel key is 32 bytes")
        if self.until_epoch < 1 or self.lease_epochs < 0 or self.rate_kbit < 0:
            raise ConfigError(f"client {self.name}: epochs and rates must not be negative")
        if self.expires_epoch and self.expires_epoch < self.until_epoch:
            raise ConfigError(f"client {self.name}: expires before its first grant")

    def __repr__(self) -> str:
        return (
            f"ClientRecord(name={self.name!r}, client_id={self.client_id}, "
            f"address={self.address}, until_epoch={self.until_epoch}, revoked={self.revoked})"
        )

    def grant_for(self, current_epoch: int, chain_length: int) -> int:
        """The last epoch whose key this client may hold while the service is in
        ``current_epoch``; no extension for a revoked client."""
        ceiling = min(self.expires_epoch or chain_length, chain_length)
        if self.revoked or self.lease_epochs == 0:
            return min(self.until_epoch, ceiling)
        return max(self.until_epoch, min(current_epoch + self.lease_epochs, ceiling))

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "client_id": self.client_id,
            "address": str(self.address),
            "roaming_port": self.roaming_port,
            "channel_key": self.channel_key.hex(),
            "until_epoch": self.until_epoch,
            "lease_epochs": self.lease_epochs,
            "expires_epoch": self.expires_epoch,
            "rate_kbit": self.rate_kbit,
            "revoked": self.revoked,
        }

    @classmethod
    def from_json(cls, fields: Fields) -> ClientRecord:
        record = cls(
            name=fields.string("name"),
            client_id=fields.integer("client_id", 1, MAX_CLIENT_ID),
            address=parse_address(fields.string("address"), "client address"),
            roaming_port=fields.integer("roaming_port", 1, 65535),
            channel_key=fields.hex_bytes("channel_key", KEY_BYTES),
            until_epoch=fields.integer("until_epoch", 1),
            lease_epochs=fields.integer("lease_epochs", 0),
            expires_epoch=fields.integer("expires_epoch", 0),
            rate_kbit=fields.integer("rate_kbit", 0),
            revoked=fields.boolean("revoked"),
        )
        fields.done()
        return record


CLIENT_LIST_MAGIC = b"SRCL"
_CLIENT_LIST_HEADER = struct.Struct("!4sBQ12s")


@dataclass(frozen=True, slots=True)
class ClientList:
    """The legitimate-client list; ``generation`` grows with every change."""

    generation: int = 0
    clients: tuple[ClientRecord, ...] = ()
    # Indexes, built once: ``by_id`` runs for every migration-port datagram and
    # ``by_address`` for every accepted connection; a scan of thousands of clients each time
    # would make every message's cost grow with the deployment (and a spoofer's too).
    _ids: dict[int, ClientRecord] = field(init=False, repr=False, compare=False)
    _addresses: dict[IPAddress, tuple[ClientRecord, ...]] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        ids: dict[int, ClientRecord] = {}
        addresses: dict[IPAddress, tuple[ClientRecord, ...]] = {}
        for client in self.clients:
            ids.setdefault(client.client_id, client)  # the first, as a scan finds it
            addresses[client.address] = (*addresses.get(client.address, ()), client)
        object.__setattr__(self, "_ids", ids)
        object.__setattr__(self, "_addresses", addresses)

    def by_name(self, name: str) -> ClientRecord:
        for client in self.clients:
            if client.name == name:
                return client
        raise ConfigError(f"no client named {name!r} in this deployment")

    def by_id(self, client_id: int) -> ClientRecord | None:
        return self._ids.get(client_id)

    def by_address(self, address: IPAddress) -> list[ClientRecord]:
        return list(self._addresses.get(address, ()))

    def next_client_id(self) -> int:
        return max((client.client_id for client in self.clients), default=0) + 1

    def add(self, record: ClientRecord) -> ClientList:
        if any(client.name == record.name for client in self.clients):
            raise ConfigError(f"client {record.name!r} is already subscribed")
        if self.by_id(record.client_id) is not None:
            raise ConfigError(f"client id {record.client_id} is already in use")
        return ClientList(self.generation + 1, (*self.clients, record))

    def revoke(self, name: str) -> ClientList:
        record = self.by_name(name)
        if record.revoked:
            raise ConfigError(f"client {name!r} is already revoked")
        clients = tuple(replace(c, revoked=True) if c.name == name else c for c in self.clients)
        return ClientList(self.generation + 1, clients)

    def seal(self, secret: DeploymentSecret, random: Random) -> bytes:
        key = derive_key(secret.group_key, Purpose.CLIENT_LIST, secret.deployment_id)
        nonce = random(12)
        header = _CLIENT_LIST_HEADER.pack(CLIENT_LIST_MAGIC, FORMAT_VERSION, self.generation, nonce)
        body = dump_object(
            "server-roaming/clients",
            FORMAT_VERSION,
            {"clients": [client.to_json() for client in self.clients]},
        )
        aad = header + secret.deployment_id
        return header + ChaCha20Poly1305(key).encrypt(nonce, body, aad)

    @classmethod
    def open(cls, data: bytes, secret: DeploymentSecret) -> ClientList:
        if len(data) < _CLIENT_LIST_HEADER.size + 16:
            raise MalformedMessageError("client list is truncated")
        magic, version, generation, nonce = _CLIENT_LIST_HEADER.unpack_from(data)
        if magic != CLIENT_LIST_MAGIC or version != FORMAT_VERSION:
            raise MalformedMessageError("not a server-roaming client list (bad magic or version)")
        header = data[: _CLIENT_LIST_HEADER.size]
        key = derive_key(secret.group_key, Purpose.CLIENT_LIST, secret.deployment_id)
        try:
            body = ChaCha20Poly1305(key).decrypt(
                nonce, data[_CLIENT_LIST_HEADER.size :], header + secret.deployment_id
            )
        except InvalidTag:
            raise AuthenticationError(
                "client list failed authentication (tampered, or another deployment's)"
            ) from None
        fields = parse_object(body, "server-roaming/clients", FORMAT_VERSION)
        clients = tuple(ClientRecord.from_json(item) for item in fields.list_of_objects("clients"))
        fields.done()
        names = [client.name for client in clients]
        if len(set(names)) != len(names):
            raise ConfigError("client list names a client twice")
        return cls(generation, clients)


# --- bundles ------------------------------------------------------------------------------


def _server_list_key(channel_key: bytes, deployment_id: bytes) -> bytes:
    return derive_key(channel_key, Purpose.SERVER_LIST, deployment_id)


def seal_servers(
    servers: tuple[Endpoint, ...],
    channel_key: bytes,
    deployment_id: bytes,
    name: str,
    random: Random,
) -> bytes:
    nonce = random(12)
    plaintext = ",".join(str(server) for server in servers).encode()
    aad = deployment_id + name.encode()
    sealed = ChaCha20Poly1305(_server_list_key(channel_key, deployment_id)).encrypt(
        nonce, plaintext, aad
    )
    return nonce + sealed


def open_servers(
    sealed: bytes, channel_key: bytes, deployment_id: bytes, name: str
) -> tuple[Endpoint, ...]:
    from migrate.endpoints import parse_server_list

    if len(sealed) < 12 + 16:
        raise MalformedMessageError("sealed server list is truncated")
    try:
        plaintext = ChaCha20Poly1305(_server_list_key(channel_key, deployment_id)).decrypt(
            sealed[:12], sealed[12:], deployment_id + name.encode()
        )
    except InvalidTag:
        raise AuthenticationError(
            "sealed server list failed authentication (tampered, or another client's)"
        ) from None
    try:
        text = plaintext.decode()
    except UnicodeDecodeError:
        raise MalformedMessageError("sealed server list is not UTF-8 text") from None
    return parse_server_list(text)


@dataclass(frozen=True, slots=True)
class Bundle:
    """What a subscribed client installs: its keys and the deployment's public schedule."""

    deployment_id: bytes
    name: str
    client_id: int
    address: IPAddress
    roaming_port: int
    vip: IPAddress
    service_port: int
    channel_key: bytes
    key_index: int
    chain_key: bytes
    sealed_servers: bytes
    chain_length: int
    m: MSchedule
    tick: float
    start: float
    delta: float
    gamma: float
    #: Optional sealed pebble index of ``K_1 .. K_t`` (``migrate.chainindex``, sealed with
    #: ``K_C``): a client with a long range starts within a few index spacings of hashes.
    chain_index: bytes = b""
    #: The deployment's k (PROTOCOL.md section 4); stored only when not 1.
    active: int = 1

    def __repr__(self) -> str:
        return f"Bundle(name={self.name!r}, deployment={self.deployment_id.hex()}, <secret>)"

    def __post_init__(self) -> None:
        check_name(self.name)
        if not 1 <= self.key_index <= self.chain_length:
            raise ConfigError(
                f"bundle key index {self.key_index} is outside the chain 1..{self.chain_length}"
            )
        if self.active < 1:  # checked against N when the sealed server list is opened
            raise ConfigError(f"bundle: active must be at least 1, got {self.active}")

    def servers(self) -> tuple[Endpoint, ...]:
        return open_servers(self.sealed_servers, self.channel_key, self.deployment_id, self.name)

    def schedule_params(self) -> ScheduleParams:
        return ScheduleParams(self.servers(), self.tick, self.start, self.m, self.delta, self.gamma)

    def _index_context(self) -> bytes:
        return self.deployment_id + struct.pack("!I", self.client_id)

    def pebble_index(self) -> PebbleIndex | None:
        """The bundle's pebble index, opened; None if it carries none."""
        if not self.chain_index:
            return None
        return open_index(
            self.chain_index,
            self.channel_key,
            self._index_context(),
            self.chain_key,
            self.key_index,
        )

    def with_index(self, random: Random, progress: Progress | None = None) -> Bundle:
        """This bundle carrying the pebble index of its range (one hash and one length per
        epoch up to ``key_index``, now)."""
        index = build_index(
            self.chain_key,
            self.key_index,
            DEFAULT_INDEX_SPACING,
            progress,
            index_units(self.m),
            m_tag(self.m),
        )
        sealed = seal_index(index, self.channel_key, self._index_context(), self.chain_key, random)
        return replace(self, chain_index=sealed)

    def chain(self) -> KeyChain:
        return KeyChain(self.chain_key, self.key_index, self.pebble_index())

    @classmethod
    def issue(
        cls,
        deployment: Deployment,
        secret: DeploymentSecret,
        record: ClientRecord,
        random: Random,
    ) -> Bundle:
        chain = secret.chain(deployment.chain_length)
        return cls(
            deployment_id=deployment.deployment_id,
            name=record.name,
            client_id=record.client_id,
            address=record.address,
            roaming_port=record.roaming_port,
            vip=deployment.vip,
            service_port=deployment.service_port,
            channel_key=record.channel_key,
            key_index=record.until_epoch,
            chain_key=chain.key(record.until_epoch),
            sealed_servers=seal_servers(
                deployment.servers,
                record.channel_key,
                deployment.deployment_id,
                record.name,
                random,
            ),
            chain_length=deployment.chain_length,
            m=deployment.m,
            tick=deployment.tick,
            start=deployment.start,
            delta=deployment.delta,
            gamma=deployment.gamma,
            active=deployment.active,
        )

    def encode(self) -> bytes:
        return dump_object(
            BUNDLE_FORMAT,
            FORMAT_VERSION,
            {
                "deployment_id": self.deployment_id.hex(),
                "name": self.name,
                "client_id": self.client_id,
                "address": str(self.address),
                "roaming_port": self.roaming_port,
                "vip": str(self.vip),
                "service_port": self.service_port,
                "channel_key": self.channel_key.hex(),
                "key_index": self.key_index,
                "chain_key": self.chain_key.hex(),
                "sealed_servers": base64.b64encode(self.sealed_servers).decode(),
                "chain_length": self.chain_length,
                "m": _m_to_json(self.m),
                "tick": self.tick,
                "start": self.start,
                "delta": self.delta,
                "gamma": self.gamma,
                **(
                    {"chain_index": base64.b64encode(self.chain_index).decode()}
                    if self.chain_index
                    else {}
                ),
                **_active_to_json(self.active),
            },
        )

    @classmethod
    def decode(cls, data: bytes) -> Bundle:
        fields = parse_object(data, BUNDLE_FORMAT, FORMAT_VERSION)
        try:
            sealed = base64.b64decode(fields.string("sealed_servers"), validate=True)
        except ValueError:
            raise ConfigError("bundle: field 'sealed_servers' is not base64") from None
        bundle = cls(
            deployment_id=fields.hex_bytes("deployment_id", DEPLOYMENT_ID_BYTES),
            name=fields.string("name"),
            client_id=fields.integer("client_id", 1, MAX_CLIENT_ID),
            address=parse_address(fields.string("address"), "bundle address"),
            roaming_port=fields.integer("roaming_port", 1, 65535),
            vip=parse_address(fields.string("vip"), "bundle vip"),
            service_port=fields.integer("service_port", 1, 65535),
            channel_key=fields.hex_bytes("channel_key", KEY_BYTES),
            key_index=fields.integer("key_index", 1, MAX_CHAIN_LENGTH),
            chain_key=fields.hex_bytes("chain_key", KEY_BYTES),
            sealed_servers=sealed,
            chain_length=fields.integer("chain_length", 1, MAX_CHAIN_LENGTH),
            m=_m_from_json(fields, "m"),
            tick=fields.number("tick"),
            start=fields.number("start"),
            delta=fields.number("delta"),
            gamma=fields.number("gamma"),
            chain_index=_base64_field(fields, "chain_index") if fields.has("chain_index") else b"",
            active=_active_from_json(fields),
        )
        fields.done()
        return bundle


def _active_to_json(active: int) -> dict[str, int]:
    """k as stored: absent for 1, so files without k of N stay byte for byte as before."""
    return {} if active == 1 else {"active": active}


def _active_from_json(fields: Fields) -> int:
    return fields.integer("active", 1) if fields.has("active") else 1


def _base64_field(fields: Fields, name: str) -> bytes:
    try:
        return base64.b64decode(fields.string(name), validate=True)
    except ValueError:
        raise ConfigError(f"bundle: field {name!r} is not base64") from None
