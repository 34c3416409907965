"""Driving a stream codec in tests: steps of bytes in either direction, fresh point checked."""

from __future__ import annotations

from typing import TypeVar

from migrate.codec import StreamCodec

C = TypeVar("C", bound=StreamCodec)


def c2s(data: bytes) -> tuple[str, bytes]:
    return ("c2s", data)


def s2c(data: bytes) -> tuple[str, bytes]:
    return ("s2c", data)


def feed(codec: C, *steps: tuple[str, bytes]) -> C:
    """Feed ``steps`` in order; the fresh point never moves back."""
    for direction, data in steps:
        before = codec.fresh
        (codec.feed_c2s if direction == "c2s" else codec.feed_s2c)(data)
        assert codec.fresh.c2s >= before.c2s
        assert codec.fresh.s2c >= before.s2c
    return codec
