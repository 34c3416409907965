"""An HTTP upload follows the service across roams (issue 15, "Uploads").

Three servers run Debian's nginx with its own WebDAV module (``dav_methods PUT``: the request
body is stored as a file under the server's root). curl on c1 PUTs 8 MiB of random bytes
through the VIP, rate-limited (``--limit-rate``) so that the body is still arriving across
several roams; curl sends ``Expect: 100-continue`` first, as it does for any upload this size,
and nginx answers the interim ``100 Continue`` before the body. Each roam re-creates the
connection on the next server by replaying the unanswered request, head and body so far, to
that server's nginx (migrate.codec: the fresh point stays at the request's first byte until
its response ends).

The PUT must get its ``201 Created`` (curl exit 0, never a reset), the connection must have
been handed over at least three times while the body was unanswered, each time with replay
bytes beyond one datagram (the replay stream), and the file must be stored on exactly one
server that finished the upload, byte-identical to what curl sent (SHA-256). An earlier
server's nginx saw its connection closed mid-body and stored nothing, or, when the roam came
after the whole body had reached it but before curl had acknowledged the answer, stored the
same whole file (the PUT is replayed to the next server, as any unanswered request is: keeping
replicas' data equal is the service's own replication, docs/operators-guide.md); never a
partial file.
"""

from __future__ import annotations

import hashlib
import os

import pytest

from labs.faults import handoffs, live_lab, shim_problems
from labs.services import DAV_PUT

pytestmark = pytest.mark.system

SIZE = 8 * 1024 * 1024
RATE = "1200K"  # curl's --limit-rate: about 7 s of upload, several roams (one every ~0.75 s)
NAME = "upload.bin"


def test_an_8_mib_http_put_spans_three_roams_and_is_stored_intact() -> None:
    data = os.urandom(SIZE)
    digest = hashlib.sha256(data).hexdigest()
    with live_lab(
        tick=0.5,
        m=1,
        service="nginx",
        service_config=DAV_PUT,
        min_switches=12,
        switch_window=24.0,
    ) as roaming:
        source = roaming.lab.workdir / "upload-source.bin"
        source.write_bytes(data)
        roaming.start()
        roaming.wait_for_schedule(0.2)
        result = roaming.lab["c1"].run(
            ["curl", "-sS", "--fail", "--limit-rate", RATE, "-T", str(source),
             "-o", "/dev/null", "-w", "%{http_code} %{local_port} %{time_total}",
             roaming.url(f"/{NAME}")],
            timeout=180,
        )  # fmt: skip
        events = handoffs(roaming)
        complaints = [
            f"{shim.host} {e['event']}: {str(e.get('reason', e.get('error', '')))[:160]}"
            for shim in [*roaming.servers.values(), *roaming.clients.values()]
            for e in shim.events()
            if e["level"] != "info" and e["event"] != "handoff"
        ]
        roaming.stop()
        problems = shim_problems(roaming)
        stored = {
            host: hashlib.sha256(path.read_bytes()).hexdigest()
            for host in roaming.server_hosts
            if (path := roaming.workdir / f"www-{host}" / NAME).exists()
        }
    fields = result.stdout.split()
    port = int(fields[1]) if result.returncode == 0 and len(fields) == 3 else None
    mine = [e for e in events if e.get("port") == port]
    detail = "; ".join(
        f"epoch {e.get('epoch')} {e.get('outcome')} {e.get('bytes_replayed')}: "
        f"{str(e.get('detail'))[:100]}"
        for e in mine or events[:12]
    )
    detail += "\n" + "\n".join(complaints[:12])
    assert result.returncode == 0, f"curl: {result.stderr[-800:]}\n{detail}"
    assert fields[0] == "201", f"{result.stdout}\n{detail}"
    assert mine, f"no hand-over of the uploading connection\n{detail}"
    assert all(e["outcome"] == "migrated" for e in mine), detail
    big = [e for e in mine if e["bytes_replayed"] > 60_000]
    assert len(big) >= 3, f"only {len(big)} hand-overs beyond one datagram: {detail}"
    # The server that answered holds the file; a server the connection left holds nothing, or
    # (left after the whole body had reached its nginx, the response not yet acknowledged by
    # the client) the same whole file: a replayed PUT is applied again, never a partial one.
    final = roaming.host_of(mine[-1]["server"])
    assert stored.get(final) == digest, f"stored: {stored} (final {final}), sent {digest}\n{detail}"
    assert set(stored.values()) == {digest}, f"stored: {stored}, sent {digest}\n{detail}"
    assert problems == []
    print(
        "replay re-sent per roam (bytes):",
        [e["bytes_replayed"] for e in mine],
        "pauses (ms):",
        [e["pause_ms"] for e in mine],
        "upload seconds:",
        fields[2],
        "stored on:",
        list(stored),
    )
