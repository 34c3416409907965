"""What the client shim captures of its connections, and the checkpoints it keeps.

The capture chains (``client_shim.rules``) copy, through NFLOG, the client's SYNs and data
segments to the VIP and the carriers the servers push; ``Capture`` turns them into, per
connection (``migrate.connstore``), the newest sealed checkpoint and the client's bytes from its
fresh point on. A lost copy may leave a hole in any connection's replay bytes: every connection
is then marked unmigratable, and the loss counted.
"""

from __future__ import annotations

from collections.abc import Callable

from migrate.channel import Opener
from migrate.checkpoint import carrier_opener, open_carrier
from migrate.connstore import ConnectionStore
from migrate.errors import RoamError
from migrate.kernel.eventlog import EventLog
from migrate.kernel.nflog import NflogReader
from migrate.kernel.rawtcp import is_carrier, parse_ipv4_tcp
from migrate.registration import Bundle


class Capture:
    def __init__(
        self,
        bundle: Bundle,
        log: EventLog,
        clock: Callable[[], float],
        clock_offset: Callable[[], float],
    ) -> None:
        self.log = log
        self.clock = clock
        self.clock_offset = clock_offset
        self.client_address = str(bundle.address)
        self.vip = (str(bundle.vip), bundle.service_port)
        self.pool = {(str(s.address), s.port) for s in bundle.servers()}
        self.store = ConnectionStore()
        self.carriers: Opener = carrier_opener(
            bundle.channel_key, bundle.deployment_id, bundle.client_id
        )
        self.reader: NflogReader | None = None
        self.rejected_carriers = 0
        self.losses = 0

    def open(self, group: int) -> int:
        self.reader = NflogReader.open(group)
        return self.reader.fileno()

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
            self.reader = None

    def drain(self) -> None:
        """Everything captured so far, however much is queued. A roam's decisions need it: a
        connection whose SYN copy still waits behind a burst (1000 connects in a second fill
        more than one read) would look like one opened before the shim, and be reset."""
        assert self.reader is not None
        self.on_readable()
        while self.reader.backlog:
            self.on_readable()

    def on_readable(self) -> None:
        """The reader's callback: what one bounded read returns (the loop calls again)."""
        reader = self.reader
        assert reader is not None
        lost = reader.missed + reader.overflowed
        now = self.clock()
        for packet in reader.read():
            try:
                segment = parse_ipv4_tcp(packet.payload)
            except RoamError as error:
                self.log.event("capture_malformed", level="warning", reason=str(error))
                continue
            if segment is None:
                continue
            if (segment.dst, segment.dport) == self.vip and segment.src == self.client_address:
                if segment.syn and not segment.ack_flag:
                    self.store.on_syn(segment.sport, segment.seq, now)
                else:
                    self.store.on_segment(
                        segment.sport, segment.seq, segment.payload, segment.fin, now
                    )
            elif (segment.src, segment.sport) in self.pool and is_carrier(segment):
                self._on_carrier(segment.payload, segment.dport, now)
        if reader.missed + reader.overflowed != lost:
            # Some copies were lost: any connection may have a hole in its replay bytes.
            self.losses += 1
            self.store.give_up_all("the capture lost packets (NFLOG overflow)")
            self.log.event("capture_lost_packets", level="warning")

    def _on_carrier(self, data: bytes, port: int, now: float) -> None:
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
        self.store.on_carrier(carrier, now)
