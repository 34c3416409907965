"""``migrate.kernel.pipes``: dropping a pipe's head in the kernel and counting what it holds
(the splice relay's side pipe, ``Splice(skip=...)``)."""

from __future__ import annotations

import os

import pytest

from migrate.kernel import pipes


def test_discard_drops_exactly_the_head_and_pending_counts_the_rest() -> None:
    read_end, write_end = pipes.make_pipe()
    try:
        pipes.set_pipe_size(write_end, 1 << 20)
        data = os.urandom(700_000)
        written = 0
        while written < len(data):
            written += os.write(write_end, data[written:])
        assert pipes.pending(read_end) == len(data)
        pipes.discard(read_end, 650_000)
        assert pipes.pending(read_end) == 50_000
        assert os.read(read_end, 100_000) == data[650_000:]
        assert pipes.pending(read_end) == 0
        with pytest.raises(BlockingIOError):  # nothing there: a non-blocking pipe says so
            pipes.discard(read_end, 1)
    finally:
        os.close(read_end)
        os.close(write_end)
