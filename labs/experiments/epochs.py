"""Fixed 60-second epochs, as in the paper's experiment, from a real hash chain. Pure.

The paper's prototype used fixed-length epochs and, with two servers, a roam at every epoch.
Our schedule (PROTOCOL.md) draws every epoch's length, ``(1 + MSB_m(H'(K_i))) * tick`` with
``m >= 1``, and its server, ``servers[MSB_64(H''(K_i)) mod N]``, from the chain, so no
parameter makes it fixed. Instead of changing the protocol, the lab looks for a stretch of the
chain that happens to be what the paper ran: ``count`` consecutive epochs of one tick each,
every one on another server than the one before (with two servers: alternating), the first on
``first_server``. With ``m = 1`` an epoch has one tick with probability 1/2 and changes server
with probability 1/2, so a stretch of 7 turns up every 20 000 epochs or so; the chain is
hashed once per key drawn. The deployment's start is then set so that the stretch begins when
the experiment does: the shims run the unmodified schedule from epoch 1, long ago.
"""

from __future__ import annotations

from dataclasses import dataclass

from migrate.hashchain import chain_step
from migrate.schedule import epoch_units, server_index


@dataclass(frozen=True)
class FixedStretch:
    """Epochs ``first_epoch .. first_epoch + count - 1`` last one tick each and alternate."""

    first_epoch: int
    count: int
    units_before: int  # ticks from the start of epoch 1 to the start of ``first_epoch``
    servers: tuple[int, ...]  # server index of each epoch of the stretch


def chain_keys(chain_key: bytes, chain_length: int) -> list[bytes]:
    """``[K_1, ..., K_n]`` from ``K_n`` (``K_{i-1} = H(K_i)``)."""
    keys = [chain_key]
    for _ in range(chain_length - 1):
        keys.append(chain_step(keys[-1]))
    keys.reverse()
    return keys


def find_fixed_stretch(
    chain_key: bytes,
    chain_length: int,
    *,
    m: int,
    server_count: int,
    count: int,
    first_server: int = 0,
    spare_epochs: int = 64,
) -> FixedStretch | None:
    """The first stretch of ``count`` one-tick epochs, each on another server than the one
    before, starting on ``first_server``, that ends at least ``spare_epochs`` before the
    chain does; ``None`` if this chain has none."""
    if count < 1 or server_count < 2:
        raise ValueError("a stretch needs count >= 1 and at least two servers")
    units_before = 0
    run = 0  # consecutive qualifying epochs ending at the current one
    previous_server: int | None = None
    units_of: list[int] = []
    servers: list[int] = []
    for index, key in enumerate(chain_keys(chain_key, chain_length), start=1):
        if index + spare_epochs > chain_length:
            return None
        units = epoch_units(key, m)
        server = server_index(key, server_count)
        units_of.append(units)
        servers.append(server)
        good = units == 1 and previous_server is not None and server != previous_server
        run = run + 1 if good else 0
        previous_server = server
        if run >= count:
            first = index - count + 1
            if servers[first - 1] == first_server:
                units_before = sum(units_of[: first - 1])
                return FixedStretch(first, count, units_before, tuple(servers[first - 1 :]))
    return None
