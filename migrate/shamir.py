"""Threshold protection of the deployment secret: Shamir sharing over GF(2^8), with refresh.

Theory of operation: the paper keeps ``K_n`` and the group key under threshold cryptography and
proactive secret sharing (section III). Here the 64-byte deployment secret is split byte by
byte: each byte is the constant term of a random polynomial of degree ``k - 1`` over GF(2^8)
(the AES field), and share ``x`` holds every polynomial's value at ``x``. Any ``k`` shares
interpolate the secret at 0; fewer reveal nothing about it.

*Refresh* (Herzberg et al., 1995) adds to every share the value of a fresh random polynomial
whose constant term is zero: the secret is unchanged, but the new shares lie on a different
polynomial, so old and new shares cannot be mixed (an attacker must collect ``k`` shares of one
generation). Shares carry their generation and a check value of the secret, so mixing is
reported as such and a wrong reconstruction never goes unnoticed.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from migrate.channel import Random
from migrate.errors import ConfigError
from migrate.strictjson import dump_object, parse_object

SHARE_FORMAT = "server-roaming/share"
FORMAT_VERSION = 1
GENERATION_BYTES = 8

# GF(2^8) with the AES polynomial x^8 + x^4 + x^3 + x + 1; 3 generates the multiplicative group.
_EXP = [0] * 510
_LOG = [0] * 256
_value = 1
for _power in range(255):
    _EXP[_power] = _value
    _LOG[_value] = _power
    _value ^= (_value << 1) ^ (0x11B if _value & 0x80 else 0)
    _value &= 0xFF
for _power in range(255, 510):
    _EXP[_power] = _EXP[_power - 255]


def gf_mul(a: int, b: int) -> int:
    if a == 0 or b == 0:
        return 0
    return _EXP[_LOG[a] + _LOG[b]]


def gf_div(a: int, b: int) -> int:
    if b == 0:
        raise ZeroDivisionError("division by zero in GF(2^8)")
    if a == 0:
        return 0
    return _EXP[(_LOG[a] - _LOG[b]) % 255]


def _evaluate(coefficients: bytes | list[int], x: int) -> int:
    """Horner's rule; ``coefficients[0]`` is the constant term."""
    result = 0
    for coefficient in reversed(coefficients):
        result = gf_mul(result, x) ^ coefficient
    return result


def check_value(deployment_id: bytes, secret: bytes) -> bytes:
    return hashlib.sha256(b"server-roaming share check\x00" + deployment_id + secret).digest()[:16]


@dataclass(frozen=True, slots=True)
class Share:
    deployment_id: bytes
    generation: bytes
    threshold: int
    total: int
    index: int  # x, 1..255
    value: bytes  # one byte per secret byte
    check: bytes

    def __repr__(self) -> str:
        return f"Share(index={self.index}, threshold={self.threshold}, <secret>)"

    def encode(self) -> bytes:
        return dump_object(
            SHARE_FORMAT,
            FORMAT_VERSION,
            {
                "deployment_id": self.deployment_id.hex(),
                "generation": self.generation.hex(),
                "threshold": self.threshold,
                "shares": self.total,
                "index": self.index,
                "value": self.value.hex(),
                "check": self.check.hex(),
            },
        )

    @classmethod
    def decode(cls, data: bytes) -> Share:
        fields = parse_object(data, SHARE_FORMAT, FORMAT_VERSION)
        share = cls(
            deployment_id=fields.hex_bytes("deployment_id", 16),
            generation=fields.hex_bytes("generation", GENERATION_BYTES),
            threshold=fields.integer("threshold", 1, 255),
            total=fields.integer("shares", 1, 255),
            index=fields.integer("index", 1, 255),
            value=fields.hex_bytes("value"),
            check=fields.hex_bytes("check", 16),
        )
        fields.done()
        if share.threshold > share.total or share.index > share.total:
            raise ConfigError(
                f"share {share.index}: threshold {share.threshold} of {share.total} is impossible"
            )
        if not share.value:
            raise ConfigError(f"share {share.index} holds no value")
        return share


# A threshold of 1 makes every share the secret itself (a polynomial of degree 0): splitting
# would only multiply the copies of the secret, so it is refused rather than mistaken for
# protection. Share files of threshold 1 written before this check still decode and combine,
# so no secret is lost.
MINIMUM_THRESHOLD = 2


def _check_parameters(threshold: int, total: int) -> None:
    if threshold < MINIMUM_THRESHOLD:
        raise ConfigError(
            f"threshold {threshold} protects nothing (every share would be the secret itself); "
            f"use a threshold of at least {MINIMUM_THRESHOLD}"
        )
    if not threshold <= total <= 255:
        raise ConfigError(
            f"need threshold <= shares <= 255, got threshold {threshold} of {total} shares"
        )


def split(
    secret: bytes, deployment_id: bytes, threshold: int, total: int, random: Random
) -> list[Share]:
    """Split ``secret`` into ``total`` shares, any ``threshold`` of which recover it."""
    _check_parameters(threshold, total)
    if not secret:
        raise ConfigError("cannot split an empty secret")
    generation = random(GENERATION_BYTES)
    polynomials = [[byte, *random(threshold - 1)] for byte in secret]
    check = check_value(deployment_id, secret)
    return [
        Share(
            deployment_id,
            generation,
            threshold,
            total,
            x,
            bytes(_evaluate(poly, x) for poly in polynomials),
            check,
        )
        for x in range(1, total + 1)
    ]


def _consistent(shares: list[Share]) -> Share:
    if not shares:
        raise ConfigError("no shares given")
    first = shares[0]
    for share in shares[1:]:
        if share.deployment_id != first.deployment_id:
            raise ConfigError("shares belong to different deployments")
        if share.generation != first.generation:
            raise ConfigError(
                "shares come from different generations (old and refreshed shares cannot be mixed)"
            )
        if (share.threshold, share.total, share.check) != (
            first.threshold,
            first.total,
            first.check,
        ):
            raise ConfigError("shares disagree on threshold, count or check value")
        if len(share.value) != len(first.value):
            raise ConfigError("shares have different lengths")
    indices = [share.index for share in shares]
    if len(set(indices)) != len(indices):
        raise ConfigError(
            f"share {sorted(i for i in indices if indices.count(i) > 1)[0]} given twice"
        )
    return first


def combine(shares: list[Share]) -> bytes:
    """Recover the secret from at least ``threshold`` shares of one generation."""
    first = _consistent(shares)
    if len(shares) < first.threshold:
        raise ConfigError(f"need {first.threshold} shares to recover the secret, got {len(shares)}")
    used = shares[: first.threshold]
    xs = [share.index for share in used]
    # Lagrange basis at 0: l_i(0) = prod_{j != i} x_j / (x_j - x_i); minus is xor in GF(2^8).
    weights = []
    for i, xi in enumerate(xs):
        weight = 1
        for j, xj in enumerate(xs):
            if i != j:
                weight = gf_mul(weight, gf_div(xj, xj ^ xi))
        weights.append(weight)
    secret = bytearray(len(first.value))
    for weight, share in zip(weights, used, strict=True):
        for position, byte in enumerate(share.value):
            secret[position] ^= gf_mul(weight, byte)
    result = bytes(secret)
    if not hmac.compare_digest(check_value(first.deployment_id, result), first.check):
        raise ConfigError(
            "the shares do not reconstruct the deployment secret (wrong or corrupted)"
        )
    return result


def refresh(shares: list[Share], random: Random) -> list[Share]:
    """New shares of the same secret, without reconstructing it.

    Every given share is moved onto a new polynomial (old + random polynomial with zero
    constant term); shares not given here can no longer be combined with the new ones.
    Fewer than ``threshold`` shares are refused: their new generation could never recover the
    secret, and once the old shares are destroyed as told, the secret would be lost.
    """
    first = _consistent(shares)
    if first.threshold < MINIMUM_THRESHOLD:
        raise ConfigError(
            f"threshold {first.threshold} shares are the secret itself; refreshing them protects "
            f"nothing: split the secret again with a threshold of at least {MINIMUM_THRESHOLD}"
        )
    if len(shares) < first.threshold:
        raise ConfigError(
            f"refresh needs at least {first.threshold} shares (the threshold), got {len(shares)}: "
            "fewer would make a generation that can never recover the secret"
        )
    generation = random(GENERATION_BYTES)
    while generation == first.generation:  # pragma: no cover - 2^-64
        generation = random(GENERATION_BYTES)
    zero_polynomials = [[0, *random(first.threshold - 1)] for _ in first.value]
    return [
        Share(
            share.deployment_id,
            generation,
            share.threshold,
            share.total,
            share.index,
            bytes(
                byte ^ _evaluate(poly, share.index)
                for byte, poly in zip(share.value, zero_polynomials, strict=True)
            ),
            share.check,
        )
        for share in shares
    ]
