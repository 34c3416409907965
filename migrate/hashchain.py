"""Backward hash chain of PROTOCOL.md section 1, traversed with O(log n) memory.

Theory of operation: the deployment draws ``K_n``; ``K_{i-1} = H(K_i)``. Epoch ``i`` uses
``K_i``, so keys are *used* in the reverse order of their generation (paper section IV-A):
whoever holds ``K_t`` can compute ``K_1 .. K_t`` and nothing after epoch ``t``.

Walking the epochs forward means walking the chain backward, against the cheap direction. A
``KeyChain`` never stores the chain. It keeps a stack of *pebbles* (index, key), sorted by
index, the smallest on top, and the top pebble is the cursor. Moving the cursor to ``i`` pops
pebbles below ``i`` and then splits the gap between ``i`` and the next pebble in halves,
leaving a pebble at every midpoint. This is the recursive (binary) pebbling traversal: at most
``ceil(log2 n) + 1`` pebbles, ``O(n log n)`` hashes to visit all ``n`` epochs, so amortised
``O(log n)`` hashes per epoch advance (Jakobsson 2002 reaches the same bound worst-case).

Random access to any ``K_i`` with ``i <= t`` hashes down from the nearest pebble at or above
``i`` and does not move the cursor. Asking for ``i > t`` raises ``KeyNotHeldError``: there is
no code path from ``K_t`` to a later key.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from migrate.errors import InvalidKeyExtensionError, KeyNotHeldError

KEY_BYTES = 32
MAX_CHAIN_LENGTH = 1 << 32

_STEP = b"\x00"
_LENGTH = b"\x01"
_SERVER = b"\x02"


def chain_step(key: bytes) -> bytes:
    """``H(x) = SHA256(0x00 || x)``: from ``K_i`` to ``K_{i-1}``."""
    return hashlib.sha256(_STEP + key).digest()


def length_digest(key: bytes) -> bytes:
    """``H'(x) = SHA256(0x01 || x)``: drives the epoch length."""
    return hashlib.sha256(_LENGTH + key).digest()


def server_digest(key: bytes) -> bytes:
    """``H''(x) = SHA256(0x02 || x)``: drives the choice of server."""
    return hashlib.sha256(_SERVER + key).digest()


def msb(digest: bytes, bits: int) -> int:
    """The integer formed by the ``bits`` most significant bits of ``digest`` (big-endian)."""
    total = len(digest) * 8
    if not 0 <= bits <= total:
        raise ValueError(f"cannot take {bits} most significant bits of a {total}-bit digest")
    return int.from_bytes(digest, "big") >> (total - bits)


def hash_down(key: bytes, steps: int) -> bytes:
    """Apply ``H`` ``steps`` times."""
    for _ in range(steps):
        key = hashlib.sha256(_STEP + key).digest()
    return key


def check_key(key: bytes, what: str = "key") -> bytes:
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        size = len(key) if isinstance(key, bytes | bytearray) else type(key).__name__
        raise ValueError(f"{what} must be {KEY_BYTES} bytes, got {size}")
    return key


@dataclass(frozen=True, slots=True)
class Pebble:
    index: int
    key: bytes


class KeyChain:
    """The keys ``K_1 .. K_t`` reachable from the held key ``K_t``."""

    __slots__ = ("_held", "_pebbles", "hashes")

    def __init__(self, key: bytes, index: int) -> None:
        check_key(key, "chain key")
        if not 1 <= index <= MAX_CHAIN_LENGTH:
            raise ValueError(f"key index must be in 1..{MAX_CHAIN_LENGTH}, got {index}")
        self._held = Pebble(index, key)
        # Stack, largest index first, smallest (the cursor) last.
        self._pebbles: list[Pebble] = [self._held]
        #: Number of hash-chain steps computed so far (for benchmarks and tests).
        self.hashes = 0

    @property
    def held_index(self) -> int:
        """``t``: the index of the most recent key held."""
        return self._held.index

    @property
    def held_key(self) -> bytes:
        return self._held.key

    @property
    def cursor(self) -> int:
        return self._pebbles[-1].index

    @property
    def pebble_count(self) -> int:
        return len(self._pebbles)

    def _check_index(self, index: int) -> None:
        if index < 1:
            raise ValueError(f"epoch index must be at least 1, got {index}")
        if index > self._held.index:
            raise KeyNotHeldError(
                f"key for epoch {index} is not held (keys are held up to epoch {self._held.index})"
            )

    def _hash(self, key: bytes, steps: int) -> bytes:
        self.hashes += steps
        return hash_down(key, steps)

    def key(self, index: int) -> bytes:
        """``K_index`` by random access; the cursor does not move."""
        self._check_index(index)
        # Pebbles are sorted; the nearest at or above ``index`` is the last one that is >= it.
        for pebble in reversed(self._pebbles):
            if pebble.index >= index:
                return self._hash(pebble.key, pebble.index - index)
        raise AssertionError("the held key is always a pebble")  # pragma: no cover

    def seek(self, index: int) -> bytes:
        """Move the cursor to ``index`` and return ``K_index``.

        Forward moves cost amortised O(log n) hashes per epoch; a backward move re-splits the
        gap above it, which costs the distance moved.
        """
        self._check_index(index)
        pebbles = self._pebbles
        while pebbles[-1].index < index:
            pebbles.pop()
        top = pebbles[-1]
        while top.index > index:
            middle = (index + top.index) // 2
            # (index + top) // 2 == index when they are adjacent: step straight onto index.
            target = middle if middle > index else index
            top = Pebble(target, self._hash(top.key, top.index - target))
            pebbles.append(top)
        return top.key

    def advance(self) -> tuple[int, bytes]:
        """Move the cursor one epoch forward; returns ``(index, key)``."""
        index = self.cursor + 1
        return index, self.seek(index)

    def extend(self, key: bytes, index: int, max_steps: int) -> bool:
        """Accept ``K_index`` for a later epoch if hashing it down reaches the key held.

        Returns True if the held key changed. An extension to an epoch at or before the one held
        is accepted as a no-op only if it is consistent. ``max_steps`` bounds the work a hostile
        claim can cause (normally the chain length).
        """
        check_key(key, "extension key")
        held = self._held
        if index < 1:
            raise InvalidKeyExtensionError(f"key extension to epoch {index} is not a chain index")
        if index <= held.index:
            if not hmac.compare_digest(self.key(index), key):
                raise InvalidKeyExtensionError(
                    f"key for epoch {index} does not match the chain already held"
                )
            return False
        if index - held.index > max_steps:
            raise InvalidKeyExtensionError(
                f"key extension from epoch {held.index} to {index} exceeds the chain length"
            )
        if not hmac.compare_digest(hash_down(key, index - held.index), held.key):
            raise InvalidKeyExtensionError(
                f"key for epoch {index} does not hash down to the key held for epoch {held.index}"
            )
        self.hashes += index - held.index
        new_held = Pebble(index, key)
        self._held = new_held
        if len(self._pebbles) > 1:
            # The old held key is no longer the top of the chain; dropping it keeps the pebble
            # count within its log bound however many extensions arrive. The cursor stays.
            del self._pebbles[0]
        self._pebbles.insert(0, new_held)
        return True
