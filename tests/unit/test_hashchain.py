import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migrate.errors import InvalidKeyExtensionError, KeyNotHeldError
from migrate.hashchain import KeyChain, chain_step, hash_down, msb

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
    assert chain.pebble_count <= (300).bit_length() + 2
    assert chain.seek(200) == keys[200]


def test_hash_down_zero_steps_is_identity():
    assert hash_down(CHAIN_KEY, 0) == CHAIN_KEY
