"""What the client shim captures of its connections, and the checkpoints it keeps.

The capture chains (``client_shim.rules``) copy, through NFLOG, the client's SYNs and data
segments to the VIP and the carriers the servers push; ``Capture`` turns them into, per
connection (``migrate.connstore``), the newest sealed checkpoint and the client's bytes from its
fresh point on.

The kernel batches the copies (``CAPTURE_BATCH`` per message, at most ``CAPTURE_FLUSH_CS``
late): one request at a time from the client would otherwise wake the shim once per request
(a keep-alive GET cost it 70 us of CPU, most of it the wakeup). ``drain`` first sends the
rules' flush barrier (``client_shim.rules``), which makes the kernel send its batch at once,
inside the ``sendto``: a drain still sees every copy made before it.

Copies are lost when the reader falls behind (its socket buffer overflows). NFLOG's sequence
numbers say how many, not whose; the store finds out per connection instead (a hole in a
connection's own sequence space, a carrier that does not fit the connection tracked on its
port: see ``migrate.connstore``), counts it there and marks only that connection. Each lost
batch is logged (``capture_lost_packets``, with the count) and so is each connection a loss
touched (``capture_loss``, with the port and why). The socket buffer is large and each
readiness event reads until the socket is empty, so that a burst does not overflow it.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

from client_shim.rules import BARRIER_MARK, BARRIER_PORT
from migrate.channel import Opener
from migrate.checkpoint import carrier_opener, open_carrier
from migrate.connstore import CLIENT_FIN, ConnectionStore
from migrate.errors import RoamError
from migrate.kernel.eventlog import EventLog
from migrate.kernel.nflog import NflogReader
from migrate.kernel.rawtcp import ACK, FIN, SYN, segment_fields
from migrate.registration import Bundle
from migrate.replaystream import DEFAULT_MAX_REPLAY

# The NFLOG socket's receive buffer (forced past rmem_max: the shim has CAP_NET_ADMIN). Copies
# are charged at their buffer's true size (a 1500-byte copy costs about 2.3 KB, a 64 KB
# segment 66 KB): 32 MiB holds about 14,000 small copies, or half a second of a client sending
# flat out at 500 Mbit/s, while the event loop is busy elsewhere (a hand-over's burst).
CAPTURE_RCVBUF = 32 * 1024 * 1024
# Reads (of up to 1024 datagrams each) per readiness event before the loop gets control back:
# enough to empty a full buffer, bounded so that a flood cannot starve the rest of the shim.
READS_PER_EVENT = 16
# The kernel's batching of copies (see the module's docstring): a batch goes out when it holds
# CAPTURE_BATCH copies, fills CAPTURE_NLBUFSIZ bytes, or is CAPTURE_FLUSH_CS hundredths of a
# second old (the kernel's least), or when a barrier is copied.
CAPTURE_BATCH = 64
CAPTURE_FLUSH_CS = 1
CAPTURE_NLBUFSIZ = 65536


class Capture:
    def __init__(
        self,
        bundle: Bundle,
        log: EventLog,
        clock: Callable[[], float],
        clock_offset: Callable[[], float],
        max_replay: int = DEFAULT_MAX_REPLAY,
    ) -> None:
        self.log = log
        self.clock = clock
        self.clock_offset = clock_offset
        self.client_address = str(bundle.address)
        self.vip = (str(bundle.vip), bundle.service_port)
        self.pool = {(str(s.address), s.port) for s in bundle.servers()}
        # As a copy's header has them (``segment_fields``): compared for every copy.
        self._client_packed = bundle.address.packed
        self._vip_packed = bundle.vip.packed
        # --max-replay per connection; the store's total bounds the client's memory.
        self.store = ConnectionStore(per_connection_limit=max_replay, total_limit=4 * max_replay)
        self.carriers: Opener = carrier_opener(
            bundle.channel_key, bundle.deployment_id, bundle.client_id
        )
        self.reader: NflogReader | None = None
        self.barrier: socket.socket | None = None
        self.barrier_failures = 0
        self.rejected_carriers = 0
        self.lost_batches = 0  # reads after which NFLOG reported lost copies
        # Set when a read stored a checkpoint: a hand-over waiting for one looks again at once.
        self.carriers_arrived = asyncio.Event()

    @property
    def losses(self) -> int:
        """Connections' losses in total: captured streams that missed bytes or their SYN."""
        return self.store.losses

    def open(self, group: int) -> int:
        self.reader = NflogReader.open(
            group,
            rcvbuf=CAPTURE_RCVBUF,
            qthreshold=CAPTURE_BATCH,
            flush_timeout_cs=CAPTURE_FLUSH_CS,
            nlbufsiz=CAPTURE_NLBUFSIZ,
        )
        barrier = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            barrier.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, BARRIER_MARK)
            barrier.setblocking(False)
        except OSError:
            barrier.close()
            self.close()
            raise
        self.barrier = barrier
        return self.reader.fileno()

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
            self.reader = None
        if self.barrier is not None:
            self.barrier.close()
            self.barrier = None

    def flush(self) -> None:
        """Make the kernel send the copies it batches now (the rules' barrier). The barrier
        is dropped by the rule that copies it, so ``sendto`` fails with EPERM: that is the
        success. Any other outcome is counted and logged; the batch then comes within
        ``CAPTURE_FLUSH_CS``, and a drain before it may miss copies (a connection reset at
        that roam, as after a loss)."""
        barrier = self.barrier
        if barrier is None:
            return
        try:
            barrier.sendto(b"roam-capture-barrier", (self.vip[0], BARRIER_PORT))
        except PermissionError:
            return  # dropped by the barrier rule after it was copied, with the batch
        except OSError as error:
            self._barrier_failed(str(error))
            return
        self._barrier_failed("the barrier was not dropped: no barrier rule")

    def _barrier_failed(self, reason: str) -> None:
        self.barrier_failures += 1
        self.log.rejection("capture_barrier_failed", reason=reason)

    def drain(self) -> None:
        """Everything captured so far, however much is queued. A roam's decisions need it: a
        connection whose SYN copy still waits behind a burst (1000 connects in a second fill
        more than one read) would look like one opened before the shim, and be reset."""
        assert self.reader is not None
        self.flush()
        self.on_readable()
        while self.reader.backlog:
            self.on_readable()

    def on_readable(self) -> None:
        """The reader's callback: read until the socket is empty (or ``READS_PER_EVENT``
        reads; the loop then calls again)."""
        reader = self.reader
        assert reader is not None
        lost = reader.missed + reader.overflowed
        stored = self.store.carriers_stored
        for _ in range(READS_PER_EVENT):
            self._take(reader.read_payloads())
            if not reader.backlog:
                break
        if self.store.carriers_stored != stored:
            self.carriers_arrived.set()
        if reader.missed + reader.overflowed != lost:
            # Copies were lost: whose, the store finds out per connection (and logs below).
            self.lost_batches += 1
            self.log.event(
                "capture_lost_packets",
                level="warning",
                missed=reader.missed,
                overflowed=reader.overflowed,
                received=reader.received,
            )
        for port, reason in self.store.take_losses():
            self.log.event("capture_loss", level="warning", port=port, reason=reason)
        # At once, not at the roam: the connection will be reset when the service roams.
        ended = []
        for port, reason in self.store.take_unmigratable():
            if reason == CLIENT_FIN:
                ended.append(port)
            else:
                self.log.event("connection_unmigratable", level="warning", port=port, reason=reason)
        if ended:
            # Most often the connections' normal ends: one line for what this read found, not
            # one a connection (a JSON line was a sixth of a short connection's cost here).
            self.log.event(
                "connection_unmigratable",
                level="info",
                ports=ended,
                count=len(ended),
                reason=CLIENT_FIN,
            )

    def _take(self, packets: list[bytes]) -> None:
        now = self.clock()
        client, vip, vport = self._client_packed, self._vip_packed, self.vip[1]
        for packet in packets:
            try:
                segment = segment_fields(packet)
            except RoamError as error:
                self.log.event("capture_malformed", level="warning", reason=str(error))
                continue
            if segment is None:
                continue
            if segment.dst == vip and segment.dport == vport and segment.src == client:
                if segment.flags & SYN and not segment.flags & ACK:
                    self.store.on_syn(segment.sport, segment.seq, now)
                else:
                    self.store.on_segment(
                        segment.sport, segment.seq, segment.payload, bool(segment.flags & FIN), now
                    )
            elif segment.carrier and (socket.inet_ntoa(segment.src), segment.sport) in self.pool:
                self._on_carrier(segment.payload, segment.dport, segment.ack, now)

    def status(self) -> dict[str, object]:
        """The capture's counters, for the shim's status file."""
        reader = self.reader
        return {
            "copies": reader.received if reader is not None else 0,
            "lost_copies": reader.missed if reader is not None else 0,
            "overflows": reader.overflowed if reader is not None else 0,
            "lost_batches": self.lost_batches,
            "barrier_failures": self.barrier_failures,
            "connection_losses": self.store.losses,
            "unmigratable": self.store.unmigratable,
            "losses_by_port": self.store.losses_by_port(),
        }

    def _on_carrier(self, data: bytes, port: int, ack: int, now: float) -> None:
        try:
            opened, carrier = open_carrier(self.carriers, data, now + self.clock_offset())
            if carrier.client_port != port:
                raise RoamError(f"carrier for port {carrier.client_port} arrived on {port}")
        except RoamError as error:
            self.rejected_carriers += 1
            # Spoofable from outside: bounded logging (migrate.ratelog).
            self.log.rejection("carrier_rejected", error=type(error).__name__, reason=str(error))
            return
        self.carriers.accept(opened)
        self.store.on_carrier(carrier, now, ack=ack)
