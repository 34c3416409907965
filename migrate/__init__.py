"""server-roaming protocol core.

Theory of operation: everything in this package except ``migrate.kernel`` is pure. It never
opens a socket, starts an event loop, runs a subprocess or reads the clock: the current time
arrives as a ``now`` argument and randomness as a callable returning bytes. The shims
(``proxy/``, ``client_shim/``) feed it events and carry out what it returns, in the style of
aioquic's ``quic/`` package. ``migrate.kernel`` holds the thin adapters to nftables, NFQUEUE
and TCP_REPAIR that both shims share; no pure module imports it.
"""

__version__ = "0.1.0"
