"""The choices of ``roam server --live-relay``, apart from the modules that use them: the
command line imports this to build its parser, and every ``roam`` command builds it (the
modules of the relay and of live mode take half a second to import on a slow machine)."""

from __future__ import annotations

# How a live connection's relay forwards and shows its bytes to the stream state
# (proxy.checkpoints.observed_modes): "copy" through Python (the default, the longest record of
# system-test runs); "splice" (zero-copy, each bulk read teed to the stream state on the event
# loop); "splice-thread" (the same, the stream state fed by a thread per bulk direction, so that
# hashing runs beside the forwarding: the fastest for downloads on a machine with a CPU to spare,
# docs/benchmarks.md).
LIVE_RELAYS = ("copy", "splice", "splice-thread")
