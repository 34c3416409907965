"""The sealed pebble index: a fast start anywhere on a long hash chain (issue 18).

Theory of operation: walking a chain of ``n`` keys from its top costs one hash per epoch, many
minutes at ``n = 2^32``. ``roam init`` walks it once and keeps every ``2^16``-th key
(``migrate.hashchain.PebbleIndex``); a server then reaches any epoch with at most
``3 * 2^16`` hashes. The index is as secret as the chain key it comes from (it holds later keys
than any client may), so it is sealed (ChaCha20-Poly1305) with a key derived from a secret of
its holder (the group key for the deployment, ``K_C`` for a client bundle) and bound, through the
associated data, to its context (the deployment id) and to the top key it was built from: an
index for another chain, another top or another deployment fails to open, as does any change.

The index may carry *landmarks* (``migrate.schedule``): the ticks before each index epoch
begins, for the m schedule named by its tag, so that a server finds the epoch running "now"
without walking every epoch since the start.

Layout: ``"SRCI" | version (1) | log2 spacing (1) | top (8) | landmarks? (1) | m tag (16) |
nonce (12) | sealed (keys, 32 B each, then landmarks, 8 B each) | tag (16)``.
Size: ``59 + 40 * ((top - 1) // spacing)`` bytes with landmarks: 659 B for 2^20 epochs,
10.3 KiB for 2^24, 2.5 MiB for 2^32 (spacing 2^16).
"""

from __future__ import annotations

import hashlib
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from migrate.channel import Random, derive_key
from migrate.errors import AuthenticationError, ConfigError
from migrate.hashchain import MAX_CHAIN_LENGTH, PebbleIndex, check_key

INDEX_MAGIC = b"SRCI"
INDEX_VERSION = 1
INDEX_PURPOSE = "chain index"
_HEADER = struct.Struct("!4sBBQB16s12s")
_UNIT = struct.Struct("!Q")
_TAG_BYTES = 16


def _binding(top_key: bytes) -> bytes:
    return hashlib.sha256(b"server-roaming chain index\x00" + top_key).digest()


def sealed_size(top: int, spacing: int, landmarks: bool = True) -> int:
    """Bytes of a sealed index of a ``top``-key chain."""
    entry = 32 + (_UNIT.size if landmarks else 0)
    return _HEADER.size + entry * ((top - 1) // spacing) + _TAG_BYTES


def seal_index(
    index: PebbleIndex, secret: bytes, context: bytes, top_key: bytes, random: Random
) -> bytes:
    """Seal ``index`` (built from ``top_key``) with a key derived from ``secret``."""
    check_key(top_key, "chain key")
    nonce = random(12)
    bits = index.spacing.bit_length() - 1
    landmarks = bool(index.units) or (index.count == 0 and bool(index.units_tag))
    tag = index.units_tag.ljust(16, b"\x00")[:16] if landmarks else bytes(16)
    header = _HEADER.pack(INDEX_MAGIC, INDEX_VERSION, bits, index.top, landmarks, tag, nonce)
    body = index.keys + b"".join(_UNIT.pack(units) for units in index.units)
    key = derive_key(secret, INDEX_PURPOSE, context)
    return header + ChaCha20Poly1305(key).encrypt(nonce, body, header + _binding(top_key))


def open_index(data: bytes, secret: bytes, context: bytes, top_key: bytes, top: int) -> PebbleIndex:
    """The index sealed in ``data`` for the chain topped by ``K_top = top_key``.

    Raises ``ConfigError`` for a malformed file and ``AuthenticationError`` for one sealed with
    another key, for another chain or top, or changed since.
    """
    check_key(top_key, "chain key")
    if len(data) < _HEADER.size + _TAG_BYTES:
        raise ConfigError(f"chain index: {len(data)} bytes is too short for a sealed index")
    magic, version, bits, sealed_top, landmarks, tag, nonce = _HEADER.unpack_from(data)
    if magic != INDEX_MAGIC:
        raise ConfigError("chain index: not a chain index file (bad magic)")
    if version != INDEX_VERSION:
        raise ConfigError(f"chain index: unsupported version {version}")
    if not 1 <= bits <= 32 or not 1 <= sealed_top <= MAX_CHAIN_LENGTH or landmarks > 1:
        raise ConfigError(f"chain index: spacing 2^{bits} or top {sealed_top} out of range")
    if sealed_top != top:
        raise ConfigError(f"chain index: built for a chain of {sealed_top} keys, not {top}")
    expected = sealed_size(top, 1 << bits, bool(landmarks))
    if len(data) != expected:
        raise ConfigError(
            f"chain index: {len(data)} bytes, expected {expected} for {top} keys every 2^{bits}"
        )
    header = data[: _HEADER.size]
    key = derive_key(secret, INDEX_PURPOSE, context)
    try:
        sealed = data[_HEADER.size :]
        body = ChaCha20Poly1305(key).decrypt(nonce, sealed, header + _binding(top_key))
    except InvalidTag:
        raise AuthenticationError(
            "chain index: does not open with this secret (another deployment, chain or a "
            "changed file)"
        ) from None
    count = (top - 1) >> bits
    keys = body[: 32 * count]
    units = tuple(_UNIT.unpack_from(body, 32 * count + _UNIT.size * k)[0] for k in range(count))
    if not landmarks:
        return PebbleIndex(top, 1 << bits, keys)
    return PebbleIndex(top, 1 << bits, keys, units, tag)
