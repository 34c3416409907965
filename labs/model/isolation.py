"""Epochs until the insiders are isolated by a likelihood ranking (no shuffle messages).

Per epoch the servers under attack are known (each server counts the attack it sees, e.g. the
packets its gate drops from unregistered sources while it is active). Under the model's
insider attack the bots flood exactly the insiders' servers, so:

* an insider's server is attacked in every epoch;
* an innocent client's server is attacked only when the draw puts it on a server that an
  insider also drew: with probability ``q_e = |attacked_e| / k`` in epoch e.

For client c after E epochs, with ``h_c`` epochs in which its server was attacked, the
likelihood ratio "insider" against "innocent" is ``prod over hit epochs of 1/q_e``, and 0 as
soon as one of its epochs was not attacked. With ``q_e`` the same for every client of an
epoch, ranking by that ratio is ranking by ``h_c``: the model ranks by the count. The
insiders are *isolated* at the first epoch E where every insider's count is greater than
every innocent client's (then the top M of the ranking are exactly the insiders).

With k = 1 every client shares the one server: nothing separates them (never isolated).
"""

from __future__ import annotations

import numpy as np

from labs.model.schedule import draw_active

CHUNK = 64


def epochs_to_isolate(
    rng: np.random.Generator,
    *,
    servers: int,
    k: int,
    clients: int,
    insiders: int,
    max_epochs: int,
) -> int | None:
    """The first epoch count at which all insiders rank above every innocent client, or
    ``None`` if that does not happen within ``max_epochs``. Insiders are clients 0..M-1
    (their ids do not matter: every client's draw is independent)."""
    if insiders <= 0:
        return 0
    counts = np.zeros(clients, dtype=np.int64)
    done = 0
    while done < max_epochs:
        chunk = min(CHUNK, max_epochs - done)
        active = draw_active(rng, chunk, servers, k)
        slot = rng.integers(0, k, size=(chunk, clients), dtype=np.int64)
        assign = np.take_along_axis(active, slot, axis=1)
        attacked = np.zeros((chunk, servers), dtype=bool)
        np.put_along_axis(attacked, assign[:, :insiders], True, axis=1)
        hits = np.take_along_axis(attacked, assign, axis=1)
        running = counts[None, :] + np.cumsum(hits, axis=0)
        lowest_insider = running[:, :insiders].min(axis=1)
        highest_innocent = running[:, insiders:].max(axis=1)
        isolated = np.nonzero(lowest_insider > highest_innocent)[0]
        if isolated.size:
            return done + int(isolated[0]) + 1
        counts = running[-1]
        done += chunk
    return None


def isolation_epoch(assign: np.ndarray, insiders: np.ndarray) -> int | None:
    """On a given schedule's assignments ``assign[e, c]`` (epochs of the horizon, clients),
    with the bots attacking exactly the insiders' servers: the number of epochs after which
    the insiders first rank above every innocent client, or ``None``."""
    ids = np.asarray(insiders, dtype=np.int64)
    if ids.size == 0:
        return 0
    epochs, clients = assign.shape
    servers = int(assign.max()) + 1
    attacked = np.zeros((epochs, servers), dtype=bool)
    np.put_along_axis(attacked, assign[:, ids], True, axis=1)
    running = np.cumsum(np.take_along_axis(attacked, assign, axis=1), axis=0)
    innocent = np.ones(clients, dtype=bool)
    innocent[ids] = False
    if not innocent.any():
        return 0
    separated = running[:, ids].min(axis=1) > running[:, innocent].max(axis=1)
    found = np.nonzero(separated)[0]
    return int(found[0]) + 1 if found.size else None


def ranking(hits: np.ndarray) -> np.ndarray:
    """Client ids, most suspect first, from an (epochs, clients) array of "my server was
    attacked" flags: by count, ties by id (stable)."""
    return np.argsort(-hits.sum(axis=0), kind="stable")
