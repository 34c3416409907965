"""What re-sending an upload's replay costs at each roam: the replay stream's own work.

    PYTHONPATH=. python -m labs.benchmarks.replay_stream [--sizes-mib 1,8,64] [--rounds 3]

A roam during an unanswered upload sends every replay byte from the checkpoint's fresh point
to the new server again (docs/protocol.md section 8.2). This measures that step, on loopback
TCP, with the code the shims run: the client seals 64,000-byte chunks with its stream key and
frames them, the server splits the frames, opens each chunk, stores it in its run
(``ReplayBuffers``) and seals an acknowledgement, and the client waits for the one that covers
everything. Not included: the new server's replay of those bytes into the service and the
admission of the request (section 8). Prints, per size, the median and range of the seconds
and the throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

from migrate.channel import Kind
from migrate.reincarnation import (
    stream_ack_opener,
    stream_ack_sealer,
    stream_opener,
    stream_sealer,
)
from migrate.replaystream import Ack, Chunk, FrameReader, ReplayBuffers, chunks, stream_frame

MIB = 1024 * 1024
KEY, DEPLOYMENT, CLIENT = bytes(range(32)), bytes(16), 1


async def one_push(data: bytes) -> float:
    buffers = ReplayBuffers(max_replay=len(data), max_per_client=len(data))
    opener = stream_opener(KEY, DEPLOYMENT, CLIENT)
    ack_sealer = stream_ack_sealer(KEY, DEPLOYMENT, CLIENT, sender=0)
    served = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        frames = FrameReader()
        while chunk_bytes := await reader.read(65536):
            for message in frames.feed(chunk_bytes):
                opened = opener.open(message, time.time())
                ack = buffers.add(CLIENT, Chunk.decode(opened.plaintext), time.time())
                opener.accept(opened)
                sealed = ack_sealer.seal(Kind.REINCARNATE_READY, ack.encode(), time.time())
                writer.write(stream_frame(sealed))
            await writer.drain()
        writer.close()
        served.set()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    sealer = stream_sealer(KEY, DEPLOYMENT, CLIENT)
    acks = stream_ack_opener(KEY, DEPLOYMENT, CLIENT)
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for piece in chunks(7, 40000, 6379, 0, 0, data):
        writer.write(stream_frame(sealer.seal(Kind.REINCARNATE_REQUEST, piece.encode(),
                                              time.time())))  # fmt: skip
        await writer.drain()
    frames, end = FrameReader(), 0
    while end < len(data):
        for message in frames.feed(await reader.read(65536)):
            opened = acks.open(message, time.time())
            acks.accept(opened)
            end = Ack.decode(opened.plaintext).end
    elapsed = time.perf_counter() - started
    writer.close()
    await writer.wait_closed()
    await served.wait()
    server.close()
    await server.wait_closed()
    assert buffers.slice(CLIENT, 40000, 0, len(data)) == data
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes-mib", default="1,8,64")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"replay stream on loopback, {args.rounds} rounds per size")
    print(f"{'replay':>8} {'seconds (median, min-max)':>28} {'MB/s':>8}")
    for size_mib in (int(s) for s in args.sizes_mib.split(",")):
        data = os.urandom(size_mib * MIB)
        runs = [asyncio.run(one_push(data)) for _ in range(args.rounds)]
        median = statistics.median(runs)
        print(f"{size_mib:>5} MiB {median:>12.3f} ({min(runs):.3f}-{max(runs):.3f}) "
              f"{len(data) / median / 1e6:>12.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
