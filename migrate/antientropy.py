"""Anti-entropy of the pool's control state: revocations and strikes reach every server.

Theory of operation: a revocation sent once over UDP may be lost, and a server that is down
when it is sent never hears it. So every server, once per sync period (with jitter), sends its
whole grow-only control state (``migrate.control.Facts``: revoked client ids, and each struck
client's first offence epoch) to every other server over the authenticated group-control
channel, and merges what it receives (``ServerPool.merge``): a union of revocations, the
earliest epoch of each strike. Merging is commutative, associative and idempotent, so the
servers converge whatever the order, loss or duplication of the messages, and a server that
returns from a crash catches up from the first message of any live peer.

Why not a consensus store (etcd, a Raft log): the pool's state only grows and merges without
conflict, so it needs no agreement on an order; a quorum store would make every server's
firewall depend on a majority being reachable, which is what roaming must not depend on (any
one server alone keeps serving on its own schedule). Each server here stays independent: it
needs no peer to run, and one live peer to catch up.

Why push the whole state at a constant rate rather than a digest and pull on difference: every
server sends one message of one fixed size (``pad_size``) to every peer each period, whatever
happened, so an eavesdropper learns nothing from the control traffic about which server struck
a client (and so which one is active), nor when.

Bound: a server misses one period's message from one live peer with the loss probability
``p``; with ``k`` live peers that hold a fact it misses them all with ``p**k``, so after ``n``
periods it still lacks the fact with probability at most ``p**(k*n)`` (``convergence_periods``).
At 50 % loss and one live peer, ``CONVERGENCE_PERIODS`` = 20 periods leave less than one chance
in a million.
"""

from __future__ import annotations

import math

from migrate.control import facts_size

SYNC_PERIOD_S = 1.0
CONVERGENCE_PERIODS = 20
"""Periods within which a live server holds every fact of a live peer, at 50 % loss of control
datagrams, with probability at least 1 - 1e-6 (see ``convergence_periods``)."""


def pad_size(clients: int) -> int:
    """The one size of every ``Facts`` message of a deployment with ``clients`` clients: the
    largest state it can have (revoked clients have no strike, so at most one entry each)."""
    return facts_size(0, clients)


def convergence_periods(loss: float, live_peers: int = 1, miss: float = 1e-6) -> int:
    """Periods after which a server lacks a fact held by ``live_peers`` peers with probability
    at most ``miss``, when each message is lost with probability ``loss``."""
    if not 0 <= loss < 1 or live_peers < 1 or not 0 < miss < 1:
        raise ValueError("loss must be in [0, 1), live_peers >= 1 and miss in (0, 1)")
    if loss == 0:
        return 1
    return max(1, math.ceil(math.log(miss) / (live_peers * math.log(loss))))
