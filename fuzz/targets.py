"""One fuzz target per parser: feed it any bytes; it raises only when a contract is broken.

The contract of every parser of outside input (docs/reliability.md): it either accepts the
input or raises a typed ``RemoteError`` (``migrate.errors``), and a rejected message changes no
state: replay windows, the client's schedule and keys, the server pool's state. Anything else
that escapes a target (``ValueError``, ``UnicodeDecodeError``, ``RecursionError``, an
``AssertionError`` from a state comparison) is a bug, and both the hypothesis tests
(tests/unit/test_fuzz_parsers.py) and the atheris harnesses (``fuzz/fuzz_*.py``) report it.

Targets that reach past a seal do so honestly: besides the raw bytes (which an outsider can
send, and which the AEAD refuses), they seal the fuzzed bytes as plaintext with the real key,
as a subscribed but malicious client (or a buggy server) could, so the parsers and checks
behind the seal see arbitrary content too.

Every target is pure and deterministic: state is built fresh for each input.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import struct
from collections.abc import Callable
from typing import Any

from migrate.channel import (
    HEADER_BYTES,
    Freshness,
    Kind,
    Opener,
    Purpose,
    Sealer,
    derive_key,
    parse_header,
)
from migrate.checkpoint import (
    SEALED_BYTES,
    Carrier,
    Checkpoint,
    TcpSnapshot,
    carrier_opener,
    carrier_sealer,
    open_carrier,
    open_checkpoint,
    seal_checkpoint,
)
from migrate.codec import Http11Codec
from migrate.control import ControlChannel, Revoke, Strike, Threat, Trigger, decode_control
from migrate.endpoints import parse_server_list
from migrate.errors import RemoteError, RoamError, SubscriptionExpiredError
from migrate.hashchain import KeyChain
from migrate.pool import PoolState, ServerPool
from migrate.registration import (
    Bundle,
    ClientList,
    ClientRecord,
    Deployment,
    DeploymentSecret,
    open_servers,
)
from migrate.reincarnation import (
    Answer,
    Phase,
    Request,
    admit,
    client_id_of,
    request_opener,
    request_sealer,
)
from migrate.schedule import EpochSchedule, MSchedule, ScheduleParams
from migrate.shamir import Share
from migrate.updates import ClientRoamingState, decode_update, update_sealer

Target = Callable[[bytes], None]

# --- fixed world ----------------------------------------------------------------------------

DEPLOYMENT_ID = bytes(range(16))
CHANNEL_KEY = bytes(range(32))
GROUP_KEY = bytes(range(32, 64))
CHAIN_TOP = bytes(range(100, 132))
CHAIN_LENGTH = 2000
CLIENT_ID = 3
HELD = 400  # the client's keys reach epoch HELD
START = 1_000_000.0
NOW = START + 50.0
SERVERS = parse_server_list("10.0.0.1:80,10.0.0.2:80,10.0.0.3:80")
DEPLOYMENT = Deployment(
    deployment_id=DEPLOYMENT_ID,
    servers=SERVERS,
    vip=ipaddress.ip_address("10.99.0.1"),
    service_port=80,
    chain_length=CHAIN_LENGTH,
    m=MSchedule(4, ((10, 6),)),
    tick=0.5,
    start=START,
    delta=0.05,
    gamma=0.05,
)
SECRET = DeploymentSecret(DEPLOYMENT_ID, CHAIN_TOP, GROUP_KEY)
ALICE = ClientRecord("alice", CLIENT_ID, ipaddress.ip_address("10.0.0.50"), 47474, CHANNEL_KEY, 400)
CLIENTS = ClientList(1, (ALICE,))
_HELD_KEY = KeyChain(CHAIN_TOP, CHAIN_LENGTH).key(HELD)
_CHECKPOINT_KEY = derive_key(GROUP_KEY, Purpose.CHECKPOINT)


def _counter_random(n: int) -> bytes:
    return bytes(n)  # deterministic nonces: fine for tests, never for keys in use


# --- helpers ------------------------------------------------------------------------------


def windows(opener: Opener) -> dict[int, tuple[int, int]]:
    return {sender: (w.highest, w.bitmap) for sender, w in opener.windows.items()}


def expect_rejected_or(call: Callable[[], Any]) -> Any:
    """``call()``'s value, or None if it raised a typed error of outside input."""
    try:
        return call()
    except RemoteError:
        return None


def fit(data: bytes, size: int) -> bytes:
    """``data`` cut or zero-padded to exactly ``size`` bytes (to reach fixed-size parsers)."""
    return data[:size].ljust(size, b"\0")


# --- channel envelope -----------------------------------------------------------------------


def channel_header(data: bytes) -> None:
    header = expect_rejected_or(lambda: parse_header(data))
    if header is not None:
        assert len(data) >= HEADER_BYTES
        assert header.counter > 0


def channel_open(data: bytes) -> None:
    """Any bytes to an opener: refused (an outsider cannot seal) and no window moves."""
    key = derive_key(CHANNEL_KEY, Purpose.UPDATE_S2C)
    opener = Opener(key, b"ctx")
    sealer = Sealer(key, 9, b"ctx")
    opener.accept(opener.open(sealer.seal(Kind.ROAMING_UPDATE, b"x", NOW), NOW))
    before = windows(opener)
    opened = expect_rejected_or(lambda: opener.open(data, NOW))
    assert opened is None, "an unsealed message opened"
    # A tampered copy of a genuine message: data XORed into it.
    genuine = bytearray(sealer.seal(Kind.ROAMING_UPDATE, b"payload", NOW))
    for i, byte in enumerate(data[: len(genuine)]):
        genuine[i] ^= byte
    tampered = bytes(genuine)
    opened = expect_rejected_or(lambda: opener.open(tampered, NOW))
    if any(data[: len(genuine)]):
        assert opened is None, "a tampered message opened"
    assert windows(opener) == before


# --- roaming updates ----------------------------------------------------------------------


def client_state() -> ClientRoamingState:
    params = ScheduleParams(SERVERS, DEPLOYMENT.tick, START, DEPLOYMENT.m)
    schedule = EpochSchedule(KeyChain(_HELD_KEY, HELD), params)
    return ClientRoamingState(
        schedule, CHANNEL_KEY, DEPLOYMENT_ID, CLIENT_ID, CHAIN_LENGTH, Freshness(5.0, 1.0)
    )


def client_snapshot(state: ClientRoamingState) -> tuple[object, ...]:
    return (
        state.schedule.chain.held_index,
        state.schedule.chain.held_key,
        state.schedule.anchor,
        state.schedule.params.m,
        windows(state.opener),
        tuple(state.offset_samples),
    )


def update_plaintext(data: bytes) -> None:
    expect_rejected_or(lambda: decode_update(data))


def receive_update(state: ClientRoamingState, message: bytes, now: float) -> bool:
    """Deliver; True if accepted. A rejection must leave ``state`` exactly as it was."""
    before = client_snapshot(state)
    try:
        state.receive(message, now)
    except RoamError:  # the shim logs any RoamError as update_rejected
        assert client_snapshot(state) == before, "a rejected update changed the client"
        return False
    return True


def update_message(data: bytes) -> None:
    """Raw bytes, then the same bytes sealed as an authentic update's plaintext."""
    state = client_state()
    assert not receive_update(state, data, NOW), "unsealed bytes were accepted as an update"
    sealer = update_sealer(CHANNEL_KEY, DEPLOYMENT_ID, CLIENT_ID, sender=1)
    message = sealer.seal(Kind.ROAMING_UPDATE, data, NOW)
    if receive_update(state, message, NOW):
        # Accepted once: the same message again is a replay and changes nothing.
        assert not receive_update(state, message, NOW + 0.01)


def authentic_update_plaintext(plaintext: bytes, now: float = NOW) -> None:
    state = client_state()
    sealer = update_sealer(CHANNEL_KEY, DEPLOYMENT_ID, CLIENT_ID, sender=1)
    receive_update(state, sealer.seal(Kind.ROAMING_UPDATE, plaintext, now), now)


# --- checkpoints and carriers ---------------------------------------------------------------

_BODY_BYTES = SEALED_BYTES - 1 - 12 - 16


def sample_checkpoint(replay: bytes = b"GET / HTTP/1.1\r\n\r\n") -> Checkpoint:
    return Checkpoint(
        conn_id=b"c" * 16,
        client=("10.0.0.50", 40000),
        vport=80,
        epoch=7,
        counter=3,
        taken_at=NOW - 1,
        tcp=TcpSnapshot(1000, 2000, 1448, 7, 7, True, True, 5),
        codec="http",
        c2s_fresh=0,
        c2s_pos=len(replay),
        s2c_fresh=0,
        s2c_pos=10,
        c2s_hash=hashlib.sha256(replay).digest(),
        s2c_hash=hashlib.sha256(b"0123456789").digest(),
    )


def checkpoint_body(data: bytes) -> None:
    for body in (data, fit(data, _BODY_BYTES)):
        checkpoint = expect_rejected_or(lambda body=body: Checkpoint.decode_body(body))
        if checkpoint is not None:
            assert Checkpoint.decode_body(checkpoint.encode_body()) == checkpoint


def sealed_checkpoint(data: bytes) -> None:
    """Raw bytes never open; a body sealed with the pool's key parses or is refused."""
    assert expect_rejected_or(lambda: open_checkpoint(data, _CHECKPOINT_KEY, DEPLOYMENT_ID)) is None
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    nonce = bytes(12)
    body = fit(data, _BODY_BYTES)
    sealed = (
        b"\x01"
        + nonce
        + ChaCha20Poly1305(_CHECKPOINT_KEY).encrypt(nonce, body, b"checkpoint" + DEPLOYMENT_ID)
    )
    expect_rejected_or(lambda: open_checkpoint(sealed, _CHECKPOINT_KEY, DEPLOYMENT_ID))
    # Version 3: an authentic body followed by any range record (parsed or refused).
    record = data[:186]
    header = bytes([3]) + len(record).to_bytes(2, "big")
    plain = sample_checkpoint().encode_body() + record
    aad = b"checkpoint" + DEPLOYMENT_ID + header
    sealed = header + nonce + ChaCha20Poly1305(_CHECKPOINT_KEY).encrypt(nonce, plain, aad)
    expect_rejected_or(lambda: open_checkpoint(sealed, _CHECKPOINT_KEY, DEPLOYMENT_ID))


def carrier(data: bytes) -> None:
    """Carrier plaintext parser, raw carriers at the client's opener, authentic garbage."""
    size = struct.calcsize("!16sHQQQQ") + SEALED_BYTES
    for plaintext in (data, fit(data, size)):
        expect_rejected_or(lambda plaintext=plaintext: Carrier.decode(plaintext))
    opener = carrier_opener(CHANNEL_KEY, DEPLOYMENT_ID, CLIENT_ID)
    assert expect_rejected_or(lambda: open_carrier(opener, data, NOW)) is None
    assert windows(opener) == {}
    sealer = carrier_sealer(CHANNEL_KEY, DEPLOYMENT_ID, CLIENT_ID, sender=0)
    for plaintext in (data, fit(data, size)):
        message = sealer.seal(Kind.CHECKPOINT_CARRIER, plaintext, NOW)
        result = expect_rejected_or(lambda message=message: open_carrier(opener, message, NOW))
        if result is None:
            assert windows(opener) == {}, "a rejected carrier moved the replay window"


# --- re-incarnation -------------------------------------------------------------------------


def reincarnation_request(data: bytes) -> None:
    """Request and answer parsers, the server's opener, and ``admit`` on authentic garbage."""
    expect_rejected_or(lambda: Request.decode(data))
    expect_rejected_or(lambda: Answer.decode(data))
    expect_rejected_or(lambda: client_id_of(data))
    opener = request_opener(CHANNEL_KEY, DEPLOYMENT_ID, CLIENT_ID)
    assert expect_rejected_or(lambda: opener.open(data, NOW)) is None
    sealer = request_sealer(CHANNEL_KEY, DEPLOYMENT_ID, CLIENT_ID)
    message = sealer.seal(Kind.REINCARNATE_REQUEST, data, NOW)
    _admit_message(opener, message)


def _admit_message(opener: Opener, message: bytes) -> None:
    def attempt() -> object:
        opened = opener.open(message, NOW)
        request = Request.decode(opened.plaintext)
        return admit(
            opened,
            request,
            ALICE,
            "10.0.0.50",
            1000,
            True,
            _CHECKPOINT_KEY,
            DEPLOYMENT_ID,
            now=NOW,
            epoch_length=3.0,
        )

    # Refusals are typed: outside input (RemoteError) or the client's expired keys.
    with contextlib.suppress(RemoteError, SubscriptionExpiredError):
        attempt()
    assert windows(opener) == {}, "admit must not accept: the server accepts after serving"


def authentic_request(
    phase: int, positions: tuple[int, int, int], replay: bytes, checkpoint: Checkpoint | None
) -> None:
    """A request with a genuine or absent checkpoint and chosen positions, sealed by Alice."""
    sealed = b""
    if checkpoint is not None:
        sealed = seal_checkpoint(checkpoint, _CHECKPOINT_KEY, DEPLOYMENT_ID, _counter_random)
    sent, received, replay_from = positions
    head = struct.pack("!BQHHQQQ", phase, 8, 40000, 80, sent, received, replay_from)
    opener = request_opener(CHANNEL_KEY, DEPLOYMENT_ID, CLIENT_ID)
    sealer = request_sealer(CHANNEL_KEY, DEPLOYMENT_ID, CLIENT_ID)
    _admit_message(opener, sealer.seal(Kind.REINCARNATE_REQUEST, head + sealed + replay, NOW))


# --- control --------------------------------------------------------------------------------


def pool() -> ServerPool:
    return ServerPool(DEPLOYMENT, SECRET, CLIENTS, SERVERS[0])


def pool_snapshot(server: ServerPool) -> tuple[object, ...]:
    return (
        server.state.encode(),
        server.schedule.anchor,
        server.schedule.params.m,
        dict(server.strikes),
        dict(server.blocks),
    )


def control(data: bytes) -> None:
    """Control parser, raw and authentic-garbage messages at a server's control channel."""
    expect_rejected_or(lambda: decode_control(data))
    channel = ControlChannel(GROUP_KEY, DEPLOYMENT_ID, sender=1)
    operator = ControlChannel(GROUP_KEY, DEPLOYMENT_ID, sender=0xFFFF_FFFF)
    assert expect_rejected_or(lambda: channel.open(data, NOW)) is None
    message = operator.sealer.seal(Kind.GROUP_CONTROL, data, NOW)
    result = expect_rejected_or(lambda: channel.open(message, NOW))
    assert windows(channel.opener) == {}
    if result is not None:
        _opened, parsed = result
        if isinstance(parsed, Threat | Trigger | Revoke):
            apply_control(parsed)


def apply_control(message: Threat | Trigger | Revoke | Strike, now: float = NOW) -> None:
    """A parsed control message applied to a server: applied, or refused with no change."""
    server = pool()
    before = pool_snapshot(server)
    try:
        server.apply(message, now)
    except RoamError:  # the shim logs any RoamError as control_rejected
        assert pool_snapshot(server) == before, "a refused control message changed the server"


# --- files: deployments, secrets, bundles, shares, client lists, server state ---------------

VALID_FILES: dict[str, bytes] = {
    "deployment": DEPLOYMENT.encode(),
    "secret": SECRET.encode(),
    "bundle": Bundle.issue(DEPLOYMENT, SECRET, ALICE, _counter_random).encode(),
    "state": PoolState(DEPLOYMENT_ID).encode(),
}
_FILE_READERS: dict[str, Callable[[bytes], object]] = {
    "deployment": Deployment.decode,
    "secret": DeploymentSecret.decode,
    "bundle": Bundle.decode,
    "state": PoolState.decode,
    "share": Share.decode,
}


def file_bytes(data: bytes) -> None:
    """Any bytes as each kind of file: read, or refused with a ``ConfigError``-like error."""
    for reader in _FILE_READERS.values():
        expect_rejected_or(lambda reader=reader: reader(data))


def file_document(kind: str, document: object) -> None:
    """A JSON document (often a valid file with one field changed) read as ``kind``."""
    data = json.dumps(document).encode()
    value = expect_rejected_or(lambda: _FILE_READERS[kind](data))
    if value is not None and kind == "bundle":
        assert isinstance(value, Bundle)
        expect_rejected_or(value.servers)


def mutated_file(data: bytes) -> None:
    """A valid file with one field replaced: the first byte picks the file and the field,
    the rest (as JSON if it parses, else as a string) is the new value."""
    if not data:
        return
    kinds = sorted(VALID_FILES)
    kind = kinds[data[0] % len(kinds)]
    document = json.loads(VALID_FILES[kind])
    names = sorted(document)
    name = names[(data[0] // len(kinds)) % len(names)]
    text = data[1:].decode("utf-8", "replace")
    try:
        value: object = json.loads(text)
    except (ValueError, RecursionError):
        value = text
    document[name] = value
    # json.dumps refuses what it cannot write (e.g. too deep): not the reader's concern
    with contextlib.suppress(ValueError, RecursionError):
        file_document(kind, document)


def client_list(data: bytes) -> None:
    """Sealed client lists: raw bytes and authentic garbage."""
    assert expect_rejected_or(lambda: ClientList.open(data, SECRET)) is None
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    nonce = bytes(12)
    header = struct.pack("!4sBQ12s", b"SRCL", 1, 5, nonce)
    key = derive_key(GROUP_KEY, Purpose.CLIENT_LIST, DEPLOYMENT_ID)
    sealed = header + ChaCha20Poly1305(key).encrypt(nonce, data, header + DEPLOYMENT_ID)
    expect_rejected_or(lambda: ClientList.open(sealed, SECRET))


def server_list(data: bytes) -> None:
    """Server lists: as text (deployment files, the CLI) and sealed in a bundle."""
    expect_rejected_or(lambda: parse_server_list(data.decode("utf-8", "replace")))
    assert (
        expect_rejected_or(lambda: open_servers(data, CHANNEL_KEY, DEPLOYMENT_ID, "alice")) is None
    )
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    key = derive_key(CHANNEL_KEY, Purpose.SERVER_LIST, DEPLOYMENT_ID)
    nonce = bytes(12)
    sealed = nonce + ChaCha20Poly1305(key).encrypt(nonce, data, DEPLOYMENT_ID + b"alice")
    expect_rejected_or(lambda: open_servers(sealed, CHANNEL_KEY, DEPLOYMENT_ID, "alice"))


# --- stream codec ---------------------------------------------------------------------------


def codec_steps(steps: list[tuple[bool, bytes]], name: str = "http") -> None:
    """Chunks in both directions: the codec never raises; its fresh point never goes back and
    never passes the bytes fed; a session state stays within its bound and parses again; an
    unreplayable connection is degraded too. ``auto`` also checks the detection."""
    from migrate.autodetect import AutoCodec
    from migrate.codec import MAX_INTERIM_KEPT, StreamCodec, codec_for
    from migrate.resp import MAX_STATE_BYTES, StateReplies

    codec: StreamCodec = AutoCodec() if name == "auto" else codec_for(name)
    if name == "http":
        assert isinstance(codec, Http11Codec)
    fed = [0, 0]
    last = codec.fresh
    boundaries = 0
    for to_server, chunk in steps:
        if to_server:
            codec.feed_c2s(chunk)
        else:
            codec.feed_s2c(chunk)
        fed[0 if to_server else 1] += len(chunk)
        fresh = codec.fresh
        assert last.c2s <= fresh.c2s <= fed[0]
        assert last.s2c <= fresh.s2c <= fed[1]
        assert codec.boundaries >= boundaries
        last, boundaries = fresh, codec.boundaries
        if codec.degraded is not None:
            assert isinstance(codec.degraded, str)
        if codec.unreplayable is not None:
            assert codec.degraded is not None or name == "auto"
        if fresh.state:
            assert len(fresh.state) <= MAX_STATE_BYTES
            replies = StateReplies(fresh.state)  # a checkpoint's state parses again
            replies.feed(chunk)
        if isinstance(codec, Http11Codec):
            # Interim response ends: increasing, within the service's bytes, bounded.
            ends = list(codec.interim_ends)
            assert ends == sorted(set(ends))
            assert all(0 < end <= fed[1] for end in ends)
            assert len(ends) <= MAX_INTERIM_KEPT


def _steps(data: bytes) -> list[tuple[bool, bytes]]:
    """Bytes as steps: each step is a control byte (bit 7: direction; bits 0-6: length)."""
    steps: list[tuple[bool, bytes]] = []
    i = 0
    while i < len(data):
        control_byte = data[i]
        length = control_byte & 0x7F
        steps.append((not control_byte & 0x80, data[i + 1 : i + 1 + length]))
        i += 1 + length
    return steps


def codec(data: bytes) -> None:
    codec_steps(_steps(data))


def resp(data: bytes) -> None:
    """The RESP (redis) codec; and the same bytes as a checkpoint's session state."""
    from migrate.resp import RespCodec

    codec_steps(_steps(data), "resp")
    expect_rejected_or(lambda: RespCodec(state=data))


def memcached(data: bytes) -> None:
    codec_steps(_steps(data), "memcached")


def autodetect(data: bytes) -> None:
    """The detection never raises, answers once ``final``, and never changes its mind."""
    from migrate.autodetect import DETECT_BYTES, detect, detect_server_first

    first = data[:DETECT_BYTES]
    whole = detect(first, final=True)
    assert whole is not None
    for cut in range(len(first) + 1):
        early = detect(first[:cut])
        assert early is None or early == whole
    detect_server_first(first)
    codec_steps(_steps(data), "auto")


# --- packets: the client shim's NFLOG capture and carrier segments ---------------------------


def packet(data: bytes) -> None:
    """An IPv4/TCP packet as the capture paths see it, and the same bytes as an NFLOG message
    body: parsed, or refused with ``MalformedPacketError``; checksums never raise."""
    from migrate.kernel.nflog import parse_packet_message
    from migrate.kernel.rawtcp import checksums_valid, is_carrier, parse_ipv4_tcp

    segment = expect_rejected_or(lambda: parse_ipv4_tcp(data))
    if segment is not None:
        is_carrier(segment)
    with contextlib.suppress(RemoteError):
        checksums_valid(data)
    nflog = parse_packet_message(7, 2, memoryview(data))
    if nflog.payload:
        expect_rejected_or(lambda: parse_ipv4_tcp(nflog.payload))


# --- registry -------------------------------------------------------------------------------


def _channel(data: bytes) -> None:
    channel_header(data)
    channel_open(data)


def _updates(data: bytes) -> None:
    update_plaintext(data)
    update_message(data)


def _checkpoint(data: bytes) -> None:
    checkpoint_body(data)
    sealed_checkpoint(data)


def _files(data: bytes) -> None:
    file_bytes(data)
    mutated_file(data)


def _registration(data: bytes) -> None:
    client_list(data)
    server_list(data)


TARGETS: dict[str, Target] = {
    "channel": _channel,
    "updates": _updates,
    "checkpoint": _checkpoint,
    "carrier": carrier,
    "reincarnation": reincarnation_request,
    "control": control,
    "files": _files,
    "registration": _registration,
    "codec": codec,
    "resp": resp,
    "memcached": memcached,
    "autodetect": autodetect,
    "packet": packet,
}


def _sample_packet() -> bytes:
    from migrate.kernel.rawtcp import build_ipv4_tcp, carrier_option

    return build_ipv4_tcp(
        "10.0.0.1",
        "10.0.0.50",
        80,
        40000,
        1000,
        2000,
        0x18,
        502,
        [carrier_option(b"x")],
        b"carrier",
    )


def seeds(name: str) -> list[bytes]:
    """Valid inputs to start a coverage-guided fuzzer from."""
    from migrate.control import encode_control
    from migrate.updates import EpochSync, KeyExtension, MChange, RoamingUpdate, encode_update

    update = RoamingUpdate(
        (MChange(5, 20),), EpochSync(100, 101, 1.5), KeyExtension(401, bytes(32))
    )
    checkpoint = sample_checkpoint()
    sealed = seal_checkpoint(checkpoint, _CHECKPOINT_KEY, DEPLOYMENT_ID, _counter_random)
    request = Request(Phase.PREPARE, 8, 40000, 80, 18, 10, 0, sealed, b"GET / HTTP/1.1\r\n\r\n")
    table: dict[str, list[bytes]] = {
        "channel": [Sealer(b"k" * 32, 1).seal(Kind.ROAMING_UPDATE, b"x", NOW)],
        "updates": [encode_update(update)],
        "checkpoint": [checkpoint.encode_body()],
        "carrier": [Carrier.of(checkpoint, sealed).encode()],
        "reincarnation": [request.encode()],
        "control": [encode_control(Threat(5, 20)), encode_control(Revoke(3))],
        "files": [b"\x00" + VALID_FILES["deployment"], b"\x05{}", *VALID_FILES.values()],
        "registration": [b"10.0.0.1:80,10.0.0.2:80"],
        "packet": [_sample_packet()],
        "codec": [
            b"\x12GET / HTTP/1.1\r\n\r\n\xa6HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        ],
        "resp": [
            b"\x1d*2\r\n$6\r\nSELECT\r\n$1\r\n2\r\n\x85+OK\r\n"
            b"\x15*1\r\n$5\r\nMULTI\r\n\x85+OK\r\n\x06PING\r\n"
            b"\x9b%1\r\n+a\r\n|1\r\n+k\r\n:1\r\n$?\r\n",
        ],
        "memcached": [
            b"\x14set k 0 0 5\r\nhello\r\n\x89STORED\r\n\x07get k\r\n"
            b"\x9cVALUE k 0 5\r\nhello\r\nEND\r\n\x0fmg k v q\r\nmn\r\n\x84MN\r\n",
        ],
        "autodetect": [
            b"*1\r\n$4\r\nPING\r\n",
            b"GET / HTTP/1.1\r\n\r\n",
            b"get k\r\n",
            b"\x16\x03\x01\x00",
        ],
    }
    return table[name]
