import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migrate.errors import InvalidKeyExtensionError, KeyNotHeldError
from migrate.hashchain import (
    KeyChain,
    PebbleIndex,
    build_index,
    chain_step,
    hash_down,
    msb,
)

from .vectors import CHAIN_KEY, CHAIN_LENGTH, K1_HEX


def naive_chain(top: bytes, n: int) -> list[bytes]:
    """keys[i] = K_i, computed the obvious way."""
    keys = [b""] * (n + 1)
    keys[n] = top
    for i in range(n, 1, -1):
        keys[i - 1] = chain_step(keys[i])
    return keys


def test_public_vector_k1():
    assert KeyChain(CHAIN_KEY, CHAIN_LENGTH).key(1).hex() == K1_HEX


def test_step_is_sha256_with_prefix_zero():
    import hashlib

    assert chain_step(CHAIN_KEY) == hashlib.sha256(b"\x00" + CHAIN_KEY).digest()


def test_msb_takes_leading_bits():
    digest = bytes([0b1011_0000]) + bytes(31)
    assert msb(digest, 1) == 1
    assert msb(digest, 4) == 0b1011
    assert msb(digest, 0) == 0
    with pytest.raises(ValueError, match="most significant bits"):
        msb(digest, 257)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 600), top=st.binary(min_size=32, max_size=32), data=st.data())
def test_random_access_and_traversal_match_naive(n, top, data):
    keys = naive_chain(top, n)
    chain = KeyChain(top, n)
    start = data.draw(st.integers(1, n))
    assert chain.seek(start) == keys[start]
    for index in range(start, n + 1):
        assert chain.seek(index) == keys[index]
        probe = data.draw(st.integers(1, n))
        assert chain.key(probe) == keys[probe]


@pytest.mark.parametrize("n", [1, 2, 3, 7, 8, 9, 1000, 4096, 5000])
def test_traversal_memory_and_hashes_are_logarithmic(n):
    chain = KeyChain(bytes(32), n)
    bound = n.bit_length() + 1
    most = 0
    for index in range(1, n + 1):
        chain.seek(index)
        most = max(most, chain.pebble_count)
    assert most <= bound
    # O(n log n) in all: amortised log2(n) hashes per epoch, with slack for the first seek.
    assert chain.hashes <= n * bound


def test_key_after_held_index_is_refused():
    chain = KeyChain(bytes(32), 10)
    with pytest.raises(KeyNotHeldError, match="epoch 11"):
        chain.key(11)
    with pytest.raises(KeyNotHeldError):
        chain.seek(11)
    with pytest.raises(ValueError, match="at least 1"):
        chain.key(0)


def test_chain_rejects_bad_key_sizes():
    with pytest.raises(ValueError, match="32 bytes"):
        KeyChain(b"short", 10)
    with pytest.raises(ValueError, match="key index"):
        KeyChain(bytes(32), 0)


def test_extension_accepted_only_if_it_hashes_down():
    top = bytes(range(32))
    keys = naive_chain(top, 100)
    chain = KeyChain(keys[40], 40)
    chain.seek(35)
    assert chain.extend(keys[70], 70, max_steps=100) is True
    assert chain.held_index == 70
    assert chain.key(70) == keys[70]
    assert chain.cursor == 35
    assert chain.seek(36) == keys[36]
    # A same-or-earlier key that matches is a no-op.
    assert chain.extend(keys[60], 60, max_steps=100) is False
    # A key that does not hash down is refused and changes nothing.
    with pytest.raises(InvalidKeyExtensionError, match="does not hash down"):
        chain.extend(bytes(32), 80, max_steps=100)
    with pytest.raises(InvalidKeyExtensionError, match="does not match"):
        chain.extend(bytes(32), 50, max_steps=100)
    with pytest.raises(InvalidKeyExtensionError, match="exceeds"):
        chain.extend(keys[100], 100, max_steps=10)
    assert chain.held_index == 70
    with pytest.raises(KeyNotHeldError):
        chain.key(71)


def test_many_extensions_keep_pebbles_bounded():
    top = bytes(range(32))
    keys = naive_chain(top, 300)
    chain = KeyChain(keys[10], 10)
    chain.seek(5)
    for index in range(11, 301):
        chain.extend(keys[index], index, max_steps=300)
    assert chain.pebble_count <= 2 * (300).bit_length()
    assert chain.seek(200) == keys[200]


def test_hash_down_zero_steps_is_identity():
    assert hash_down(CHAIN_KEY, 0) == CHAIN_KEY


# --- worst-case bounds (issue 18) ---------------------------------------------------------


def advance_bound(n: int) -> int:
    """Hashes one epoch advance may cost: two per level of the fractal traversal, plus one."""
    return 2 * max(1, (n - 1).bit_length()) + 1


def keys_bound(n: int) -> int:
    return 2 * max(1, (n - 1).bit_length())


def walk(chain: KeyChain, first: int, last: int) -> tuple[int, int]:
    """Advance from ``first`` to ``last``; the most hashes one advance took, the most keys."""
    worst = most = 0
    for index in range(first + 1, last + 1):
        before = chain.hashes
        chain.seek(index)
        worst = max(worst, chain.hashes - before)
        most = max(most, chain.pebble_count)
    return worst, most


@pytest.mark.parametrize("n", [2, 3, 64, 1000, 1 << 12, 5000, (1 << 13) + 1])
def test_every_advance_is_bounded_in_hashes_and_keys(n):
    # The amortised traversal this replaces took n/4 hashes into epoch n/4 + 1 (108 ms at 2^20).
    keys = naive_chain(bytes(range(32)), n)
    chain = KeyChain(keys[n], n)
    assert chain.seek(1) == keys[1]
    worst, most = walk(chain, 1, n)
    assert worst <= advance_bound(n)
    assert most <= keys_bound(n)
    assert chain.key(n) == keys[n]


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 3000), top=st.binary(min_size=32, max_size=32), data=st.data())
def test_traversal_from_any_start_yields_hash_down_of_the_top(n, top, data):
    chain = KeyChain(top, n)
    start = data.draw(st.integers(1, n))
    assert chain.seek(start) == hash_down(top, n - start)
    expected = naive_chain(top, n)  # expected[i] is hash_down(top, n - i), in O(n)
    worst = most = 0
    index = start
    key = chain.held_key
    while index < n:
        before = chain.hashes
        index, key = chain.advance()
        worst = max(worst, chain.hashes - before)
        most = max(most, chain.pebble_count)
        assert key == expected[index]
    assert worst <= advance_bound(n)
    assert most <= keys_bound(n)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 5000),
    spacing_bits=st.integers(1, 6),
    top=st.binary(min_size=32, max_size=32),
    data=st.data(),
)
def test_an_index_bounds_the_start_anywhere_and_every_jump(n, spacing_bits, top, data):
    spacing = 1 << spacing_bits
    index = build_index(top, n, spacing)
    assert index.count == (n - 1) // spacing
    chain = KeyChain(top, n, index)
    position = data.draw(st.integers(1, n))
    before = chain.hashes
    assert chain.seek(position) == hash_down(top, n - position)
    assert chain.hashes - before <= 3 * spacing
    # Time passes: jumps forward (a suspended host) and back (a reanchor) stay bounded.
    for _ in range(6):
        position = data.draw(st.integers(1, n))
        before = chain.hashes
        assert chain.seek(position) == hash_down(top, n - position)
        assert chain.hashes - before <= 3 * spacing
        assert chain.pebble_count <= keys_bound(n)
        worst, _ = walk(chain, position, min(n, position + 2 * spacing))
        assert worst <= advance_bound(n)


def test_long_chain_started_in_the_middle_with_jumps_over_large_gaps():
    n = 1 << 18
    top = bytes(range(32))
    spacing = 1 << 6
    index = build_index(top, n, spacing)
    chain = KeyChain(top, n, index)

    # Pebble keys for the checks come from the index: K_(n - k*spacing) hashed down.
    def reference(i: int) -> bytes:
        k = (n - i) // spacing
        base = top if k == 0 else index.at(k * spacing)
        assert base is not None
        return hash_down(base, n - i - k * spacing)

    position = n // 4 + 12345
    before = chain.hashes
    assert chain.seek(position) == reference(position)
    assert chain.hashes - before <= 3 * spacing
    for gap in (1, 2, 97, 4096, 50_000, 70_001):
        position += gap
        before = chain.hashes
        assert chain.seek(position) == reference(position)
        assert chain.hashes - before <= 3 * spacing
        worst, most = walk(chain, position, position + 3 * spacing)
        position += 3 * spacing
        assert worst <= advance_bound(n)
        assert most <= keys_bound(n)
    assert chain.key(n // 3) == reference(n // 3)


def test_jumps_without_an_index_cost_at_most_the_gap_plus_one_advance_each():
    n = 1 << 14
    top = bytes(range(32))
    chain = KeyChain(top, n)
    chain.seek(100)
    position = 100
    for gap in (2, 3, 50, 1000, 5000):
        before = chain.hashes
        position += gap
        assert chain.seek(position) == hash_down(top, n - position)
        assert chain.hashes - before <= gap * advance_bound(n)
    # Backward: the distance moved.
    before = chain.hashes
    assert chain.seek(position - 700) == hash_down(top, n - position + 700)
    assert chain.hashes - before <= 700 + advance_bound(n)
    worst, most = walk(chain, position - 700, position + 300)
    assert worst <= advance_bound(n)
    assert most <= keys_bound(n)


def test_crossing_into_an_extension_costs_no_more_than_any_advance():
    top = bytes(range(32))
    n = 3000
    keys = naive_chain(top, n)
    chain = KeyChain(keys[1000], 1000)
    chain.seek(990)
    assert chain.extend(keys[2000], 2000, max_steps=n) is True
    assert chain.extend(keys[n], n, max_steps=n) is True
    worst, most = walk(chain, 990, n)
    assert worst <= advance_bound(n)
    assert most <= keys_bound(n) + keys_bound(1000)
    assert chain.seek(500) == keys[500]


def test_index_refuses_a_wrong_size():
    with pytest.raises(ValueError, match="holds 32 bytes"):
        PebbleIndex(100, 64, b"")
    with pytest.raises(ValueError, match="power of two"):
        PebbleIndex(100, 48, bytes(64))
    with pytest.raises(ValueError, match="topped at 100"):
        KeyChain(bytes(32), 99, PebbleIndex(100, 64, bytes(32)))
