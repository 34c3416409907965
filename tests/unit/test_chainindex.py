"""The sealed pebble index and the fast start it gives a server (issue 18)."""

import random
import stat

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import migrate.schedule as schedule_module
from migrate.chainindex import open_index, seal_index, sealed_size
from migrate.endpoints import parse_server_list
from migrate.errors import AuthenticationError, ConfigError
from migrate.hashchain import KeyChain, build_index, hash_down
from migrate.kernel.deployment import CHAIN_INDEX_FILE, DeploymentDir
from migrate.kernel.eventlog import EventLog
from migrate.schedule import (
    Anchor,
    EpochSchedule,
    MSchedule,
    ScheduleParams,
    index_units,
    m_tag,
)
from proxy.daemon import ServerOptions, ServerShim
from tests.unit.cli import run, subscribe

SERVERS = parse_server_list("10.0.0.1:80,10.0.0.2:80,10.0.0.3:80")
TOP = bytes(range(32))
GROUP = bytes(range(100, 132))
CONTEXT = bytes(16)


def fixed_random(count: int) -> bytes:
    return bytes(count)


class CountingHash:
    """Counts the hash-chain steps the schedule computes itself (the chain counts its own)."""

    def __init__(self, monkeypatch) -> None:
        self.calls = 0
        real = schedule_module.chain_step

        def step(key: bytes) -> bytes:
            self.calls += 1
            return real(key)

        monkeypatch.setattr(schedule_module, "chain_step", step)


def indexed(n: int, spacing: int, m: MSchedule):
    return build_index(TOP, n, spacing, None, index_units(m), m_tag(m))


# --- sealing ------------------------------------------------------------------------------


def test_sealed_index_opens_only_for_its_chain_secret_and_context():
    m = MSchedule(4)
    index = indexed(1000, 64, m)
    sealed = seal_index(index, GROUP, CONTEXT, TOP, fixed_random)
    assert len(sealed) == sealed_size(1000, 64)
    assert open_index(sealed, GROUP, CONTEXT, TOP, 1000) == index
    with pytest.raises(AuthenticationError, match="does not open"):
        open_index(sealed, bytes(32), CONTEXT, TOP, 1000)
    with pytest.raises(AuthenticationError, match="does not open"):
        open_index(sealed, GROUP, bytes([1]) * 16, TOP, 1000)
    with pytest.raises(AuthenticationError, match="does not open"):
        open_index(sealed, GROUP, CONTEXT, bytes(32), 1000)  # another chain key
    with pytest.raises(ConfigError, match="chain of 1000 keys, not 999"):
        open_index(sealed, GROUP, CONTEXT, TOP, 999)
    with pytest.raises(ConfigError, match="expected"):
        open_index(sealed[:-1], GROUP, CONTEXT, TOP, 1000)
    with pytest.raises(ConfigError, match="bad magic"):
        open_index(b"XXXX" + sealed[4:], GROUP, CONTEXT, TOP, 1000)
    for offset in (5, 20, len(sealed) // 2, len(sealed) - 1):
        changed = bytearray(sealed)
        changed[offset] ^= 1
        with pytest.raises((AuthenticationError, ConfigError)):
            open_index(bytes(changed), GROUP, CONTEXT, TOP, 1000)


def test_index_keys_and_landmarks_are_the_chain_and_its_schedule():
    m = MSchedule(3, ((300, 5),))
    n, spacing = 1000, 64
    index = indexed(n, spacing, m)
    plain = EpochSchedule(KeyChain(TOP, n), ScheduleParams(SERVERS, 1.0, 0.0, m))
    for k in range(1, index.count + 1):
        epoch = n - k * spacing
        assert index.at(k * spacing) == hash_down(TOP, k * spacing)
        assert index.units[k - 1] == round(plain.start_of(epoch))


# --- a fast start -------------------------------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(
    bits=st.integers(9, 12),
    changes=st.lists(st.tuples(st.integers(2, 1 << 12), st.integers(1, 8)), max_size=2),
    data=st.data(),
)
def test_schedule_with_landmarks_finds_any_epoch_as_the_walk_does(bits, changes, data):
    n, spacing = 1 << bits, 64
    changes = sorted({epoch: m for epoch, m in changes if epoch <= n}.items())
    m = MSchedule(data.draw(st.integers(1, 8)), tuple(changes))
    params = ScheduleParams(SERVERS, 0.5, 1000.0, m)
    plain = EpochSchedule(KeyChain(TOP, n), params)
    fast = EpochSchedule(KeyChain(TOP, n, indexed(n, spacing, m)), params)
    end = plain.epoch(n).end
    rng = random.Random(data.draw(st.integers(0, 1 << 30)))
    for _ in range(8):
        now = rng.uniform(1000.0, end - 0.01)
        assert fast.epoch_at(now) == plain.epoch_at(now)
    # Re-anchored (a reactive migration), then asked about times before and after the anchor.
    anchor_epoch = rng.randint(1, n)
    anchor = Anchor(anchor_epoch, plain.start_of(anchor_epoch) + 3.25)
    plain.reanchor(anchor)
    fast.reanchor(anchor)
    for _ in range(8):
        now = rng.uniform(1003.25, end)
        assert fast.epoch_at(now) == plain.epoch_at(now)


@pytest.mark.parametrize("bits", [12, 16])
def test_a_start_anywhere_costs_a_few_index_spacings_whatever_the_chain_length(bits, monkeypatch):
    # Before: one hash per epoch from K_n to epoch 1, then one advance per epoch up to now.
    n, spacing, m = 1 << bits, 64, MSchedule(4)
    index = indexed(n, spacing, m)
    counting = CountingHash(monkeypatch)
    params = ScheduleParams(SERVERS, 1.0, 0.0, m)
    for numerator in (1, 2, 3):
        now = index.units[-1] + (index.units[0] - index.units[-1]) * numerator / 4
        counting.calls = 0
        schedule = EpochSchedule(KeyChain(TOP, n, index), params)
        epoch = schedule.epoch_at(now)
        assert schedule.chain.key(epoch.index) == hash_down(TOP, n - epoch.index)
        assert epoch.start <= now < epoch.end
        # Seek to epoch 1, leap (one block hashed down), seek there: 3 + 1 + 3 spacings.
        assert schedule.chain.hashes + counting.calls <= 8 * spacing
        # Time passes: a long quiet, then the epoch at a later time costs as little.
        counting.calls = 0
        before = schedule.chain.hashes
        later = schedule.epoch_at(now + (index.units[0] - now) / 2)
        assert later.index > epoch.index
        assert schedule.chain.hashes - before + counting.calls <= 8 * spacing


def test_epoch_by_epoch_across_a_landmark_costs_no_more_than_an_advance(monkeypatch):
    n, spacing, m = 1 << 12, 64, MSchedule(2)
    index = indexed(n, spacing, m)
    counting = CountingHash(monkeypatch)
    schedule = EpochSchedule(KeyChain(TOP, n, index), ScheduleParams(SERVERS, 1.0, 0.0, m))
    landmark = n - 10 * spacing
    current = schedule.epoch_at(float(index.units[9]) - 30.0)
    assert current.index < landmark
    worst = 0
    while current.index < landmark + 5:
        before = schedule.chain.hashes + counting.calls
        current = schedule.epoch_at(current.end)
        worst = max(worst, schedule.chain.hashes + counting.calls - before)
    assert worst <= 2 * 12 + 1


# --- the CLI and the server's start -------------------------------------------------------


def init(capsys, directory, length, *extra):
    status, out, err = run(
        capsys,
        "init",
        str(directory),
        "--servers",
        "127.0.0.1:8080,127.0.0.2:8080",
        "--vip",
        "127.0.0.9",
        "--chain-length",
        str(length),
        "--m",
        "2",
        "--tick",
        "1",
        "--start",
        "0",
        *extra,
    )
    assert status == 0, err
    return out, err


def test_init_stores_the_sealed_index_and_a_server_starts_mid_chain_from_it(
    tmp_path, capsys, monkeypatch
):
    directory = tmp_path / "dep"
    length = (1 << 16) * 3 + 5
    out, err = init(capsys, directory, length)
    assert "chain index: 3 keys" in out
    assert "chain index: 100.0%" in err
    assert "s left" in err
    path = directory / CHAIN_INDEX_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    secret = DeploymentDir(directory).secret_with_index()
    assert secret.chain_index is not None
    middle = float(secret.chain_index.units[1]) + 1000.5
    counting = CountingHash(monkeypatch)
    shim = ServerShim(
        ServerOptions(directory, SERVERS_LOCAL[0], SERVERS_LOCAL[0]),
        EventLog("test", quiet=True),
        clock=lambda: middle,
    )
    schedule = shim.pool.schedule
    epoch = schedule.epoch_at(middle)
    assert epoch.start <= middle < epoch.end
    assert schedule.chain.key(epoch.index) == hash_down(secret.chain_key, length - epoch.index)
    # Without the index: about 2 x 131,072 + 65,536 x 8 hashes (epoch 1, then a walk).
    assert schedule.chain.hashes + counting.calls <= 8 * (1 << 16)


SERVERS_LOCAL = parse_server_list("127.0.0.1:8080,127.0.0.2:8080")


def test_index_can_be_built_later_and_a_changed_one_is_a_clear_error(tmp_path, capsys):
    directory = tmp_path / "dep"
    out, _ = init(capsys, directory, 1000, "--no-index")
    assert "chain index" not in out
    assert not (directory / CHAIN_INDEX_FILE).exists()
    assert DeploymentDir(directory).secret_with_index().chain_index is None
    status, out, err = run(capsys, "index", str(directory))
    assert status == 0, err
    assert "chain index: 0 keys" in out
    index = DeploymentDir(directory).secret_with_index().chain_index
    assert index is not None
    assert index.units_tag == m_tag(MSchedule(2))
    sealed = bytearray((directory / CHAIN_INDEX_FILE).read_bytes())
    sealed[-1] ^= 1
    (directory / CHAIN_INDEX_FILE).write_bytes(bytes(sealed))
    status, out, err = run(capsys, "schedule", "--deployment", str(directory), "--count", "1")
    assert status != 0
    assert out == ""
    assert err.count("\n") == 1
    assert CHAIN_INDEX_FILE in err
    assert "does not open" in err


def test_a_bundle_can_carry_the_index_of_its_own_range(tmp_path, capsys):
    from migrate.kernel.deployment import load_bundle

    directory = tmp_path / "dep"
    length = (1 << 17) + 1000
    init(capsys, directory, length, "--no-index")
    until = (1 << 17) + 500
    paths = {}
    addresses = {"plain": "127.0.0.5", "indexed": "127.0.0.6"}  # one client per address
    for name, extra in (("plain", ()), ("indexed", ("--chain-index",))):
        paths[name] = tmp_path / f"{name}.bundle"
        status, _, err = subscribe(
            capsys, directory, name, addresses[name], str(paths[name]), *extra, until=until
        )
        assert status == 0, err
    plain, indexed_bundle = load_bundle(paths["plain"]), load_bundle(paths["indexed"])
    assert plain.chain_index == b""
    index = indexed_bundle.pebble_index()
    assert index is not None
    assert index.count == (until - 1) >> 16
    assert index.top == until
    assert len(indexed_bundle.chain_index) == sealed_size(until, 1 << 16)
    chain = indexed_bundle.chain()
    middle = until // 3
    assert chain.seek(middle) == hash_down(indexed_bundle.chain_key, until - middle)
    assert chain.hashes <= 3 * (1 << 16)
    # The same start from a bundle without the index hashes from K_t.
    plain_chain = plain.chain()
    plain_chain.seek(middle)
    assert plain_chain.hashes >= until - middle
    # Another client's K_C does not open it.
    from dataclasses import replace

    with pytest.raises(AuthenticationError):
        replace(indexed_bundle, channel_key=plain.channel_key).pebble_index()
