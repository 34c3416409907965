"""Every parser of outside input under hypothesis: typed refusals, and no state change.

The targets are in ``fuzz/targets.py`` (shared with the atheris harnesses in ``fuzz/``); each
raises only when a contract is broken: an untyped error escaped, or a rejected message changed
a replay window, the client's schedule or keys, or a server's state.

Example counts come from a hypothesis profile named by ``ROAM_FUZZ_PROFILE``:

* ``fuzz``: 10,000 examples per test (the issue's bar; about 10 minutes on this 2-core
  machine, so it is run by hand and before releases: ``ROAM_FUZZ_PROFILE=fuzz make test``);
* ``fuzz-ci`` (the default, what ``bash .ci/run`` uses): 2,000 per test, about 2 minutes;
* ``fuzz-quick``: 300, for editing.

The atheris harnesses in ``fuzz/`` go further, coverage-guided, for as long as one likes.
"""

from __future__ import annotations

import json
import os
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz import targets
from migrate.checkpoint import SEALED_BYTES, Checkpoint, TcpSnapshot
from migrate.control import Revoke, Strike, Threat, Trigger
from migrate.errors import MalformedMessageError, RoamError
from migrate.reincarnation import Phase
from migrate.updates import EpochSync, KeyExtension, MChange, RoamingUpdate, encode_update

settings.register_profile(
    "fuzz",
    max_examples=10_000,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
        HealthCheck.filter_too_much,
    ],
)
settings.register_profile("fuzz-quick", settings.get_profile("fuzz"), max_examples=300)
settings.register_profile("fuzz-ci", settings.get_profile("fuzz"), max_examples=2000)
FUZZ = settings(settings.get_profile(os.environ.get("ROAM_FUZZ_PROFILE", "fuzz-ci")))

u8 = st.integers(0, 2**8 - 1)
u16 = st.integers(0, 2**16 - 1)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
i64 = st.integers(-(2**63), 2**63 - 1)
# Positions and epochs near the interesting edges as often as anywhere.
epochs = st.one_of(st.integers(0, 3), st.integers(395, 405), st.integers(1995, 2005), u64)
raw = st.binary(max_size=600)


def mutated(seeds: list[bytes]) -> st.SearchStrategy[bytes]:
    """A valid input with bytes overwritten, cut short or extended."""

    @st.composite
    def build(draw: st.DrawFn) -> bytes:
        data = bytearray(draw(st.sampled_from(seeds)))
        for _ in range(draw(st.integers(0, 4))):
            if data:
                data[draw(st.integers(0, len(data) - 1))] = draw(u8)
        cut = draw(st.integers(0, len(data)))
        tail = draw(st.binary(max_size=8))
        return bytes(data[:cut] + tail) if draw(st.booleans()) else bytes(data)

    return build()


def inputs(name: str) -> st.SearchStrategy[bytes]:
    return st.one_of(raw, mutated(targets.seeds(name)))


# --- secure channel envelope ----------------------------------------------------------------

headers = st.builds(
    lambda magic, version, kind, sender, counter, sent, tail: (
        struct.pack("!2sBBIQq", magic, version, kind, sender, counter, sent) + tail
    ),
    st.sampled_from([b"SR", b"SX", b"\0\0"]),
    st.sampled_from([0, 1, 2, 255]),
    st.integers(0, 7),
    u32,
    st.sampled_from([0, 1]) | u64,
    i64,
    st.binary(max_size=64),
)


@FUZZ
@given(data=st.one_of(inputs("channel"), headers))
def test_channel_envelope(data):
    targets.channel_header(data)
    targets.channel_open(data)


# --- roaming updates ------------------------------------------------------------------------

items = st.lists(
    st.tuples(st.integers(0, 4), st.integers(0, 48) | u16, st.binary(max_size=48)), max_size=10
).map(
    lambda parts: (
        bytes([len(parts)])
        + b"".join(struct.pack("!BH", kind, length) + value for kind, length, value in parts)
    )
)


@FUZZ
@given(data=st.one_of(inputs("updates"), items))
def test_roaming_update_bytes(data):
    targets.update_plaintext(data)
    targets.update_message(data)


update_parts = st.tuples(
    st.lists(st.builds(MChange, st.integers(0, 64), epochs), max_size=8).map(tuple),
    st.none()
    | st.builds(
        EpochSync,
        epochs,
        epochs,
        st.one_of(st.floats(-100, 100), st.integers(-(2**62), 2**62).map(lambda us: us / 1e6)),
    ),
    st.none() | st.builds(KeyExtension, epochs, st.binary(min_size=32, max_size=32)),
)


@FUZZ
@given(
    parts=update_parts,
    skew=st.one_of(st.floats(-400, 400), st.sampled_from([-300.0, -1.0, 0.0, 1.0, 300.0])),
)
def test_authentic_roaming_updates_apply_or_change_nothing(parts, skew):
    # Authentic (sealed with the client's own key), with any content and any sender clock.
    try:
        plaintext = encode_update(RoamingUpdate(*parts))
    except (MalformedMessageError, struct.error):
        return  # not representable on the wire (no item, or a value out of its field's range)
    targets.authentic_update_plaintext(plaintext, targets.NOW + skew)


# --- checkpoints and carriers ---------------------------------------------------------------

bodies = st.builds(
    lambda *values: struct.pack("!16s4sHHQQqIIHBBBIBQQQQ32s32s", *values),
    st.binary(min_size=16, max_size=16),
    st.binary(min_size=4, max_size=4),
    u16,
    u16,
    u64,
    u64,
    i64,
    u32,
    u32,
    u16,
    u8,
    u8,
    u8,
    u32,
    st.integers(0, 3) | u8,
    u64,
    u64,
    u64,
    u64,
    st.binary(min_size=32, max_size=32),
    st.binary(min_size=32, max_size=32),
)


@FUZZ
@given(data=st.one_of(inputs("checkpoint"), bodies))
def test_checkpoints(data):
    targets.checkpoint_body(data)
    targets.sealed_checkpoint(data)


carriers = st.builds(
    lambda conn, port, counter, fresh, pos, s2c, sealed: (
        struct.pack("!16sHQQQQ", conn, port, counter, fresh, pos, s2c) + sealed
    ),
    st.binary(min_size=16, max_size=16),
    u16,
    u64,
    u64,
    u64,
    u64,
    st.binary(min_size=SEALED_BYTES, max_size=SEALED_BYTES) | st.binary(max_size=SEALED_BYTES + 4),
)


@FUZZ
@given(data=st.one_of(inputs("carrier"), carriers))
def test_carriers(data):
    targets.carrier(data)


# --- re-incarnation -------------------------------------------------------------------------


@FUZZ
@given(data=inputs("reincarnation"))
def test_reincarnation_bytes(data):
    targets.reincarnation_request(data)


checkpoint_values = st.builds(
    Checkpoint,
    conn_id=st.binary(min_size=16, max_size=16),
    client=st.tuples(st.sampled_from(["10.0.0.50", "10.0.0.66"]), st.sampled_from([40000, 1])),
    vport=st.sampled_from([80, 81]),
    epoch=epochs,
    counter=st.integers(0, 2**63),
    taken_at=st.floats(0, 2e6),
    tcp=st.just(TcpSnapshot(1000, 2000, 1448, 7, 7, True, True, 5)),
    codec=st.sampled_from(["generic", "http", "resp", "memcached"]),
    c2s_fresh=st.just(0),
    c2s_pos=st.integers(0, 40),
    s2c_fresh=st.integers(0, 20),
    s2c_pos=st.integers(20, 40),
    c2s_hash=st.sampled_from([targets.sample_checkpoint().c2s_hash, bytes(32)]),
    s2c_hash=st.binary(min_size=32, max_size=32),
    unmigratable=st.booleans(),
)


@FUZZ
@given(
    phase=st.sampled_from([*Phase, 0, 5, 255]),
    positions=st.tuples(st.integers(0, 60) | u64, st.integers(0, 60) | u64, st.integers(0, 60)),
    replay=st.sampled_from([b"GET / HTTP/1.1\r\n\r\n", b""]) | st.binary(max_size=80),
    checkpoint=st.none() | checkpoint_values,
)
def test_authentic_reincarnation_requests_are_admitted_or_refused(
    phase, positions, replay, checkpoint
):
    targets.authentic_request(int(phase), positions, replay, checkpoint)


# --- control --------------------------------------------------------------------------------

control_bytes = st.tuples(st.integers(0, 6), st.binary(max_size=30)).map(
    lambda parts: bytes([parts[0]]) + parts[1]
)


@FUZZ
@given(data=st.one_of(inputs("control"), control_bytes))
def test_control_bytes(data):
    targets.control(data)


@FUZZ
@given(
    message=st.one_of(
        st.builds(Threat, st.integers(1, 32), epochs),
        st.builds(
            Trigger,
            epochs,
            epochs,
            st.one_of(st.floats(targets.START - 100, targets.NOW + 500), st.floats(-1e12, 1e12)),
        ),
        st.builds(Revoke, st.integers(1, 5) | u32),
        st.builds(Strike, st.integers(1, 5) | u32, epochs),
    ),
    now=st.floats(targets.START - 10, targets.NOW + 500),
)
def test_control_messages_apply_or_change_nothing(message, now):
    targets.apply_control(message, now)


# --- files ----------------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=40)
    | st.sampled_from(["10.0.0.1:80", "ff" * 16, "ff" * 32, "", "1e400"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)


@st.composite
def documents(draw: st.DrawFn) -> tuple[str, object]:
    kind = draw(st.sampled_from(sorted(targets.VALID_FILES)))
    document = json.loads(targets.VALID_FILES[kind])
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from([*sorted(document), "extra"]))
        if draw(st.integers(0, 4)) == 0:
            document.pop(name, None)
        else:
            document[name] = draw(json_values)
    if draw(st.integers(0, 9)) == 0:
        document = draw(json_values)
    return kind, document


@FUZZ
@given(data=inputs("files"))
def test_file_bytes(data):
    targets.file_bytes(data)
    targets.mutated_file(data)


@FUZZ
@given(case=documents())
def test_file_documents_with_fields_changed(case):
    kind, document = case
    targets.file_document(kind, document)


@FUZZ
@given(
    data=st.one_of(
        raw,
        st.text(max_size=80).map(str.encode),
        st.lists(st.dictionaries(st.text(max_size=12), json_values, max_size=12), max_size=3).map(
            lambda clients: json.dumps(
                {"format": "server-roaming/clients", "version": 1, "clients": clients}
            ).encode()
        ),
    )
)
def test_client_and_server_lists(data):
    targets.client_list(data)
    targets.server_list(data)


# --- stream codec ---------------------------------------------------------------------------

http_pieces = st.sampled_from(
    [
        b"GET / HTTP/1.1\r\n",
        b"HEAD / HTTP/1.1\r\n",
        b"POST /x HTTP/1.0\r\n",
        b"CONNECT a:1 HTTP/1.1\r\n",
        b"HTTP/1.1 200 OK\r\n",
        b"HTTP/1.1 100 Continue\r\n",
        b"HTTP/1.1 101 Switching\r\n",
        b"HTTP/1.1 204 No Content\r\n",
        b"Content-Length: 3\r\n",
        b"Content-Length: -1\r\n",
        b"Content-Length: 3, 4\r\n",
        b"Transfer-Encoding: chunked\r\n",
        b"Transfer-Encoding: gzip\r\n",
        b"Connection: close\r\n",
        b"\r\n",
        b"3\r\nabc\r\n",
        b"0\r\n\r\n",
        b"ffffffffffffffffffff\r\n",
        b"abc",
        b"\n",
        b" folded\r\n",
    ]
)


@FUZZ
@given(
    steps=st.lists(
        st.tuples(
            st.booleans(),
            st.one_of(st.lists(http_pieces, max_size=6).map(b"".join), st.binary(max_size=40)),
        ),
        max_size=16,
    )
)
def test_stream_codec_steps(steps):
    targets.codec_steps(steps)


@FUZZ
@given(data=inputs("codec"))
def test_stream_codec_bytes(data):
    targets.codec(data)


resp_pieces = st.sampled_from(
    [
        b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n",
        b"*2\r\n$6\r\nSELECT\r\n$1\r\n1\r\n",
        b"*3\r\n$4\r\nAUTH\r\n$1\r\nu\r\n$1\r\np\r\n",
        b"*1\r\n$5\r\nMULTI\r\n",
        b"*1\r\n$4\r\nEXEC\r\n",
        b"*1\r\n$5\r\nRESET\r\n",
        b"*2\r\n$9\r\nSUBSCRIBE\r\n$1\r\nc\r\n",
        b"PING\r\n",
        b"+OK\r\n",
        b"-ERR x\r\n",
        b"$3\r\nabc\r\n",
        b"$-1\r\n",
        b"*2\r\n",
        b"%1\r\n",
        b"|1\r\n",
        b">2\r\n",
        b"*?\r\n",
        b".\r\n",
        b"$?\r\n;2\r\nab\r\n;0\r\n",
        b"*99999999999\r\n",
        b"$1099511627776\r\n",
        b"_\r\n",
        b"\r\n",
    ]
)
memcached_pieces = st.sampled_from(
    [
        b"set k 0 0 3\r\nabc\r\n",
        b"set k 0 0 3 noreply\r\nabc\r\n",
        b"get k j\r\n",
        b"mg k v q\r\n",
        b"mn\r\n",
        b"ms k 2\r\nab\r\n",
        b"stats\r\n",
        b"STORED\r\n",
        b"VALUE k 0 3\r\nabc\r\n",
        b"END\r\n",
        b"VA 2\r\nab\r\n",
        b"MN\r\n",
        b"STAT a 1\r\n",
        b"ERROR\r\n",
        b"set k 0 0 1099511627776\r\n",
        b"\r\n",
    ]
)


@FUZZ
@given(
    steps=st.lists(
        st.tuples(
            st.booleans(),
            st.one_of(st.lists(resp_pieces, max_size=6).map(b"".join), st.binary(max_size=40)),
        ),
        max_size=16,
    )
)
def test_resp_codec_steps(steps):
    targets.codec_steps(steps, "resp")


@FUZZ
@given(data=inputs("resp"))
def test_resp_codec_bytes(data):
    targets.resp(data)


@FUZZ
@given(
    steps=st.lists(
        st.tuples(
            st.booleans(),
            st.one_of(st.lists(memcached_pieces, max_size=6).map(b"".join), st.binary(max_size=40)),
        ),
        max_size=16,
    )
)
def test_memcached_codec_steps(steps):
    targets.codec_steps(steps, "memcached")


@FUZZ
@given(data=inputs("memcached"))
def test_memcached_codec_bytes(data):
    targets.memcached(data)


@FUZZ
@given(data=st.one_of(inputs("autodetect"), resp_pieces, memcached_pieces, http_pieces))
def test_codec_detection(data):
    targets.autodetect(data)


# --- packets at the capture paths -----------------------------------------------------------


@st.composite
def crafted_packets(draw: st.DrawFn) -> bytes:
    """IPv4/TCP packets with odd options, wrong lengths, bad checksums, cut short."""
    from migrate.kernel.rawtcp import build_ipv4_tcp, carrier_option

    options = draw(
        st.lists(
            st.one_of(
                st.tuples(st.integers(2, 255), st.binary(max_size=10)),
                st.just(carrier_option(b"")),
                st.builds(carrier_option, st.binary(max_size=12)),
            ),
            max_size=4,
        )
    )
    try:
        data = bytearray(
            build_ipv4_tcp(
                "10.0.0.1",
                "10.0.0.50",
                draw(u16) or 1,
                draw(u16) or 1,
                draw(u32),
                draw(u32),
                draw(u8),
                draw(u16),
                options,
                draw(st.binary(max_size=64)),
            )
        )
    except RoamError:
        return b""  # options that do not fit a TCP header
    for _ in range(draw(st.integers(0, 3))):
        data[draw(st.integers(0, len(data) - 1))] = draw(u8)  # lengths, offsets, checksums
    return bytes(data[: draw(st.integers(0, len(data)))])


@FUZZ
@given(data=st.one_of(inputs("packet"), crafted_packets()))
def test_packets_at_the_capture_paths(data):
    targets.packet(data)


@FUZZ
@given(
    data=st.one_of(
        raw,
        st.dictionaries(
            st.sampled_from(["epoch", "server", "dropped", "syn", "violations", "x"]),
            json_values,
            max_size=6,
        ).map(json.dumps),
    )
)
def test_attack_reports(data):
    """``roam suspects`` report lines: a report or a one-line SuspectsError, nothing else."""
    from migrate.suspects import AttackReport, SuspectsError, parse_report

    try:
        report = parse_report(data, {"10.0.0.1:80": 0}, "line 1")
    except SuspectsError as error:
        message = str(error)
        report = None
    if report is None:
        assert "\n" not in message
        return
    assert isinstance(report, AttackReport)
    assert report.epoch >= 1
    assert min(report.dropped, report.syn, report.violations) >= 0
