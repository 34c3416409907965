"""Benchmark: the roaming data path, through both shims and across live migrations.

    python -m labs.benchmarks.roaming shims [--seconds 3] [--repeat 3] [--json]
    python -m labs.benchmarks.roaming migration [--seconds 20] [--stream-mib 64] [--opening 0]
                                                [--json]
    python -m labs.benchmarks.roaming overload [--repeat 5] [--json] [--keep-logs DIR]

Each subcommand builds one lab, runs real programs only (``roam server``/``roam client`` through
``labs.roaming.RoamingLab``, iperf3, nginx, HAProxy, and small Python clients of this package run
inside the client's namespace), measures every configuration next to its baseline in the same
run, prints a table with ratios (or, with ``--json``, the figures).

``overload`` (issue 14's overload acceptance, 1000 busy connections at a roam about every
second, against one server without roaming in the same lab): ``labs.benchmarks.roaming.overload``.

``shims`` (the steady state, no roam): ``PoolTopo(servers=2, clients=1)``. On s1: ``iperf3 -s`` on
127.0.0.1:8000 (the legacy service behind the shims and HAProxy) and another on s1's LAN address
(the direct path); nginx serving a 100-byte file on 127.0.0.1:8080 and the LAN address (the
request/response service), and the ``--http-mib`` file for the HTTP download. Paths from c1:

* ``direct``: to the services on s1's LAN address, no shims;
* ``haproxy``: HAProxy in TCP mode in the server shim's place (LAN:81/82 -> loopback), with
  ``option splice-auto`` (its default heuristic), and ``haproxy-splice``, forced to splice
  (``labs.benchmarks.relay`` builds both);
* ``shims-reconnect``: client to the VIP through ``roam client --migration reconnect`` (an nft
  rewrite) and ``roam server --migration reconnect`` (splice relay, transparent inner
  connection), in a deployment of s1 and s2 whose epochs last a day or more, s1 first: the
  service never leaves s1 while the benchmark runs;
* ``shims-live``: the same with ``--migration live`` on both shims: the client copies SYNs and
  data to NFLOG, the server relays in copy mode with the stream observers (codec, running
  hashes, replay log) and pushes checkpoints;
* ``shims-live-splice-thread``: the same with ``roam server --live-relay splice-thread`` (the
  zero-copy relay, its stream state fed by a thread per bulk direction);
* ``shims-live-window``: the same with ``--range-bodies window`` besides (checkpoints commit
  to a window of a Range-capable body; the relay drops the body's other bytes in the kernel);
* ``shims-live-1server``: ``--migration live`` in a deployment of s1 alone (tick 1 s), as the
  issue describes the steady state. (Until commit "Server shim: keep when the service
  leaves", a live server shim with no other server to hand over to spent most of a CPU
  looking for the next change of server; the two-server deployment shows the shims without
  that cost.)

Bulk: ``iperf3 -J`` client -> service and service -> client (``-R``), with the CPU the proxy
processes used; and an HTTP download: curl fetches the ``--http-mib`` file (256 MiB) from nginx
``HTTP_COPIES`` times on one keep-alive connection (the live shims' HTTP codec, not iperf3's
opaque stream). Latency: HTTP/1.1 GETs of the 100-byte file, p50/p99 of ``--requests`` in a row
on one keep-alive connection and of ``--connects`` with a new connection each. The server shim
is restarted between modes and between services (``RoamingLab.start_server`` with
``--service``); paths are interleaved round by round; ratios are taken per round against the
baselines of the same round, then the median. Last, the shims' CPU with no traffic at all.

``migration`` (roams): ``PoolTopo(servers=3, clients=1)``; nginx on each server (identical
files, identical mtimes) behind ``roam server``; one deployment after another in the same lab:

* RTT: ``ping`` c1 -> s1.
* Pause and goodput: a Python client in c1 downloads a 64 MiB file (``--stream-mib``, 1 MiB to
  4 GiB) through the VIP again and again on one keep-alive connection for ``--seconds``,
  time-stamping every receive: paced at
  8 MiB/s with a 32 KiB receive buffer (the machine is not saturated; the buffer can hide up to
  ~8 ms of a pause), and as fast as it can. Every complete file is checked (sha256). Each runs
  on three deployments: ``roaming`` (s1-s3, ``tick=0.5, m=1``: a roam about every second),
  ``1 server`` (s1 alone, the issue's baseline) and, in live mode, ``3, no roam`` (s1-s3 with
  epochs of a day: no roam, and none of the one-server cost above). The pause of a roam as the
  application sees it is the longest interval without data around the client shim's
  ``switch`` event, from the freeze on (a stall that spans several roams counts once, for the
  roam it began in); the shim's own ``pause_ms`` (freeze to switch) is reported beside it.
  With ``--migration reconnect`` the connection breaks at each roam (reset, or no data for
  ``--stall-timeout``): the client reconnects and asks for the rest with a Range request, as
  ``curl -C -`` would; its pause is the interval without data, and the time from noticing the
  break to data again is reported too. c1's ``PAWSEstab`` counter (segments its TCP dropped as
  older than the last timestamp seen) is read before and after each run.
* Cost per re-incarnated connection: a Python client in c1 opens N (1, 100, 1000) HTTP/1.1
  keep-alive connections through the VIP, one GET each, holds them across one roam
  (``tick=2``), then sends one more GET on each. From the client shim's ``roam`` event:
  connections, outcomes, ``pause_ms``; from the new server's ``prepared`` events: how long the
  preparations took; the switch's lateness against the schedule.
* New connections through roams (``--opening SECONDS``, off by default): a Python client in c1
  opens connections one after another for that long, one GET each (``Connection: close``: the
  server closes first, so that the client's kernel is not left searching among thousands of
  its own TIME_WAIT ports), live mode, against s1 alone and then roaming (``--tick``): how
  many, their times, and how many took half a second or more (a SYN the client's TCP had to
  send again waits a second), with the outcomes of the roams meanwhile.

Tests never assert times; this script is where speed is judged (docs/benchmarks.md).

The package by role: ``clients`` (the programs run in the client's namespace, ``--role``),
``orchestration`` (deployments, services, shims, counters: shared by both subcommands),
``shims`` and ``migration`` (the two subcommands' runs), ``analysis`` (pure: figures from
samples and events), ``rendering`` (the tables), ``__main__`` (the command line). The constants
below are shared by them.
"""

from __future__ import annotations

from pathlib import Path

HTTP_CHUNK = 256 * 1024
GAP_FLOOR_S = 0.0005  # inter-arrival gaps above this are kept for the per-roam analysis
SMALL_BYTES = 100
HTTP_BULK_MIB = 256  # shims: the file curl fetches HTTP_COPIES times on one connection
HTTP_COPIES = 4
BIG_MIB = 64
PACED_RATE = 8 * 1024 * 1024  # bytes/s
PACED_RCVBUF = 32 * 1024  # the kernel doubles it: ~8 ms of data at the paced rate
LATENCY_PORT = 8080
DIRECT_BULK_PORT = 5201
HAPROXY_PORTS = {"haproxy": (81, 82), "haproxy-splice": (83, 84)}
SHIM_PATHS = (
    "direct",
    "haproxy",
    "haproxy-splice",
    "shims-reconnect",
    "shims-live",
    "shims-live-splice-thread",
    "shims-live-window",
    "shims-live-1server",
)
STILL_TICK = 100_000.0  # epochs of a day or more: no roam while a benchmark runs
BASELINES = ("direct", "haproxy", "haproxy-splice")
CONNECTION_COUNTS = (1, 100, 1000)
# Past it, the lab runs out of room (nginx has 40,000 descriptors, the client 28,000 ports).
MAX_CONNECTIONS = 15_000
CLIENT_TIMEOUT_S = 180.0
# Programs of this project started in the lab run from the project root (see relay.py).
PROJECT_ROOT = Path(__file__).resolve().parents[3]
