import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migrate.channel import (
    HEADER_BYTES,
    Freshness,
    Kind,
    Opener,
    Purpose,
    ReplayWindow,
    Sealer,
    derive_key,
    parse_header,
)
from migrate.errors import (
    AuthenticationError,
    MalformedMessageError,
    ReorderedMessageError,
    ReplayedMessageError,
    StaleMessageError,
)
from tests.unit.budget import bounded_step

SECRET = bytes(range(32, 64))


def pair(context=b"ctx", strict=False, window=64):
    key = derive_key(SECRET, Purpose.UPDATE_S2C)
    return Sealer(key, sender=7, context=context), Opener(
        key, context, window_size=window, strict_order=strict
    )


def test_roundtrip_and_accept():
    sealer, opener = pair()
    message = sealer.seal(Kind.ROAMING_UPDATE, b"hello", now=1000.0)
    opened = opener.open(message, now=1000.5)
    assert opened.plaintext == b"hello"
    assert opened.header.sender == 7
    assert opened.header.sent_at == 1000.0
    opener.accept(opened)
    with pytest.raises(ReplayedMessageError):
        opener.open(message, now=1000.6)


def test_derived_keys_are_separated_by_purpose_and_context():
    keys = {
        derive_key(SECRET, purpose)
        for purpose in vars(Purpose).values()
        if isinstance(purpose, str) and " " in purpose
    }
    assert len(keys) >= 6
    assert SECRET not in keys
    assert derive_key(SECRET, Purpose.CHECKPOINT, b"a") != derive_key(
        SECRET, Purpose.CHECKPOINT, b"b"
    )


def test_message_for_another_direction_or_context_does_not_open():
    sealer, _ = pair()
    message = sealer.seal(Kind.ROAMING_UPDATE, b"x", now=1.0)
    wrong_purpose = Opener(derive_key(SECRET, Purpose.REINCARNATE_S2C), b"ctx")
    with pytest.raises(AuthenticationError):
        wrong_purpose.open(message, now=1.0)
    wrong_context = Opener(derive_key(SECRET, Purpose.UPDATE_S2C), b"other client")
    with pytest.raises(AuthenticationError):
        wrong_context.open(message, now=1.0)


@settings(max_examples=200, deadline=None)
@given(payload=st.binary(max_size=64), position=st.integers(min_value=0), flip=st.integers(1, 255))
def test_any_flipped_byte_is_rejected(payload, position, flip):
    sealer, opener = pair()
    message = bytearray(sealer.seal(Kind.ROAMING_UPDATE, payload, now=50.0))
    position %= len(message)
    message[position] ^= flip
    with pytest.raises((AuthenticationError, MalformedMessageError)):
        opener.open(bytes(message), now=50.0)
    assert opener.windows == {}


@given(cut=st.integers(0, 40))
def test_truncated_messages_are_malformed_or_forged(cut):
    sealer, opener = pair()
    message = sealer.seal(Kind.ROAMING_UPDATE, b"payload", now=5.0)
    with pytest.raises((MalformedMessageError, AuthenticationError)):
        opener.open(message[:cut], now=5.0)


def test_header_parsing_is_strict():
    sealer, _ = pair()
    message = sealer.seal(Kind.ROAMING_UPDATE, b"", now=5.0)
    assert parse_header(message).kind == Kind.ROAMING_UPDATE
    for mutate, error in [
        (lambda m: b"XX" + m[2:], "magic"),
        (lambda m: m[:2] + b"\x09" + m[3:], "version"),
        (lambda m: m[:3] + b"\x63" + m[4:], "kind"),
        (lambda m: m[:8] + bytes(8) + m[16:], "counter 0"),
    ]:
        with pytest.raises(MalformedMessageError, match=error):
            parse_header(mutate(message))


def test_freshness():
    sealer, opener = pair()
    opener.freshness = Freshness(max_age=5.0, max_skew=1.0)
    old = sealer.seal(Kind.ROAMING_UPDATE, b"", now=100.0)
    with pytest.raises(StaleMessageError, match="old"):
        opener.open(old, now=106.5)
    future = sealer.seal(Kind.ROAMING_UPDATE, b"", now=200.0)
    with pytest.raises(StaleMessageError, match="future"):
        opener.open(future, now=198.0)
    assert opener.open(future, now=199.5).plaintext == b""


def test_counters_grow_even_if_the_clock_steps_back():
    sealer, _ = pair()
    first = parse_header(sealer.seal(Kind.ROAMING_UPDATE, b"", now=100.0)).counter
    second = parse_header(sealer.seal(Kind.ROAMING_UPDATE, b"", now=50.0)).counter
    assert second == first + 1


def test_replay_window_accepts_each_counter_once_within_window():
    window = ReplayWindow(size=8)
    for counter in (10, 8, 9, 12):
        window.commit(counter)
    with pytest.raises(ReplayedMessageError):
        window.check(9)
    window.check(11)
    window.commit(11)
    with pytest.raises(StaleMessageError):
        window.check(4)  # 12 - 4 >= 8
    window.commit(100)
    with pytest.raises(StaleMessageError):
        window.check(12)


def test_strict_window_refuses_reordering():
    window = ReplayWindow(size=8, strict=True)
    window.commit(5)
    with pytest.raises(ReorderedMessageError):
        window.check(4)
    with pytest.raises(ReplayedMessageError):
        window.check(5)
    window.commit(6)


def test_each_sender_has_its_own_window():
    key = derive_key(SECRET, Purpose.UPDATE_S2C)
    a, b = Sealer(key, 1), Sealer(key, 2)
    opener = Opener(key, strict_order=True)
    late_b = b.seal(Kind.ROAMING_UPDATE, b"b", now=10.0)
    opener.accept(opener.open(a.seal(Kind.ROAMING_UPDATE, b"a", now=11.0), now=11.0))
    opener.accept(opener.open(late_b, now=11.0))  # older counter, other sender: fine
    assert HEADER_BYTES == 24


def test_unexpected_kind_is_refused():
    key = derive_key(SECRET, Purpose.UPDATE_S2C)
    opener = Opener(key, kinds=frozenset({Kind.ROAMING_UPDATE}))
    message = Sealer(key, 1).seal(Kind.GROUP_CONTROL, b"", now=1.0)
    with pytest.raises(MalformedMessageError, match="not expected"):
        opener.open(message, now=1.0)


MICROS_PER_DAY = 86_400 * 1_000_000

GAPS = [1, 63, 64, 65, 10**6, 3_600 * 10**6, 72 * 60 * 10**6, MICROS_PER_DAY, 7 * MICROS_PER_DAY]
GAPS += [365 * MICROS_PER_DAY, 2**33, 2**40, 2**62]


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("gap", GAPS)
def test_replay_window_takes_any_gap_in_constant_work(gap, strict):
    """Counters are microseconds: a quiet hour is a gap of 3.6e9, an insider's GO can jump 2^33.

    The window used to shift its bitmap by the gap (1.9 s after 72 minutes, MemoryError after
    longer gaps); now any gap costs the same, and the window still refuses what it should.
    """
    window = ReplayWindow(size=64, strict=strict)
    window.commit(1000)
    window.commit(1001)
    with bounded_step(f"a counter gap of {gap}"):
        window.commit(1001 + gap)
    assert window.highest == 1001 + gap
    assert window.bitmap.bit_length() <= window.size
    with pytest.raises(ReplayedMessageError):
        window.check(1001 + gap)
    with pytest.raises((StaleMessageError, ReorderedMessageError, ReplayedMessageError)):
        window.check(1001)
    window.commit(1002 + gap)


@settings(max_examples=300, deadline=None)
@given(
    steps=st.lists(
        st.one_of(
            st.integers(min_value=1, max_value=200),  # close together, in order
            st.integers(min_value=-70, max_value=-1),  # reordered, near and beyond the window
            st.integers(min_value=10**6, max_value=2**63),  # seconds to centuries of quiet
        ),
        min_size=1,
        max_size=60,
    ),
    size=st.sampled_from([1, 8, 64, 1024]),
)
def test_replay_window_accepts_each_counter_at_most_once_over_any_history(steps, size):
    """Model check against a set of everything accepted, over histories with any gaps."""
    window = ReplayWindow(size=size)
    accepted: set[int] = set()
    counter = 1
    for step in steps:
        counter = max(1, counter + step)
        highest = window.highest
        try:
            with bounded_step("one message of a long history"):
                window.commit(counter)
        except (ReplayedMessageError, StaleMessageError):
            assert counter in accepted or counter <= highest - size
            continue
        assert counter not in accepted
        assert counter > highest - size
        accepted.add(counter)
        assert window.bitmap.bit_length() <= size


def test_opener_takes_a_year_of_quiet_from_one_sender():
    """The whole path (open, accept) after a year: constant work, nothing accepted twice."""
    key = derive_key(SECRET, Purpose.REINCARNATE_C2S)
    sealer = Sealer(key, sender=3)
    opener = Opener(key)
    first = sealer.seal(Kind.REINCARNATE_REQUEST, b"a", now=1_000.0)
    opener.accept(opener.open(first, now=1_000.0))
    later = 1_000.0 + 365 * 86_400.0
    second = sealer.seal(Kind.REINCARNATE_REQUEST, b"b", now=later)
    with bounded_step("a message after a year of quiet"):
        opener.accept(opener.open(second, now=later))
    for message in (first, second):
        with pytest.raises((ReplayedMessageError, StaleMessageError)):
            opener.open(message, now=later)
