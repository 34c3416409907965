"""Backward hash chain of PROTOCOL.md section 1, traversed with a worst-case bound per epoch.

Theory of operation: the deployment draws ``K_n``; ``K_{i-1} = H(K_i)``. Epoch ``i`` uses
``K_i``, so keys are *used* in the reverse order of their generation (paper section IV-A):
whoever holds ``K_t`` can compute ``K_1 .. K_t`` and nothing after epoch ``t``.

Walking the epochs forward means walking the chain backward, against the cheap direction. A
``KeyChain`` never stores the chain. Its traversal counts *positions* down from a top key
``K_T`` (position ``p`` is ``K_{T-p}``; the cursor's position falls by one per epoch) and keeps
a few *pebbles* (position, key): the fractal traversal of Jakobsson (2002), in this form:

* a pebble at position ``c = (2k+1) * 2^j`` (level ``j >= 1``) is computed by a *job* that
  starts, from the pebble at ``c - 2^j`` (a multiple of ``2^(j+1)``, so a higher level or the
  top, already there), when the cursor reaches position ``c + 2^(j+1)``, and hashes twice per
  epoch advance; after ``2^(j-1)`` advances it is done, a quarter of its level's period before
  the cursor needs it, and it is dropped when the cursor passes it;
* an odd position is one hash from the even pebble just above it.

So one advance costs at most 2 hashes per level plus one, ``<= 2 log2(T) + 3`` in the worst
case, not on average, and at any time a level holds at most one pebble or one job: about
``log2(T)`` keys, never more than ``2 log2(T)`` (tests count both). The state is a function of
the cursor's position alone (jobs may run ahead after a backward seek), so any position can be
set up directly: hashing down from the top once, ``O(T)``, or, with a ``PebbleIndex`` of keys
at every ``2^16``-th position (built once by ``roam init``), from the nearest index keys: at most
``3 * 2^16`` hashes for a start anywhere in a chain of any length, and no jobs at all for the
levels at or above the index spacing (their pebbles are index keys).

Random access to any ``K_i`` with ``i <= t`` hashes down from the nearest key held at or above
``i`` and does not move the cursor (earlier epochs: from the cursor, the distance). Asking for
``i > t`` raises ``KeyNotHeldError``: there is no code path from ``K_t`` to a later key.
An extension (a later ``K_t'``) is checked by hashing down to ``K_t``; the same walk sets up the
traversal that takes over when the cursor passes ``t``, so crossing over costs nothing extra.
"""

from __future__ import annotations

import hashlib
import hmac
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from migrate.errors import InvalidKeyExtensionError, KeyNotHeldError

KEY_BYTES = 32
MAX_CHAIN_LENGTH = 1 << 32
DEFAULT_INDEX_SPACING = 1 << 16

_STEP = b"\x00"
_LENGTH = b"\x01"
_SERVER = b"\x02"


def chain_step(key: bytes) -> bytes:
    """``H(x) = SHA256(0x00 || x)``: from ``K_i`` to ``K_{i-1}``."""
    return hashlib.sha256(_STEP + key).digest()


def length_digest(key: bytes) -> bytes:
    """``H'(x) = SHA256(0x01 || x)``: drives the epoch length."""
    return hashlib.sha256(_LENGTH + key).digest()


def server_digest(key: bytes) -> bytes:
    """``H''(x) = SHA256(0x02 || x)``: drives the choice of server."""
    return hashlib.sha256(_SERVER + key).digest()


def msb(digest: bytes, bits: int) -> int:
    """The integer formed by the ``bits`` most significant bits of ``digest`` (big-endian)."""
    total = len(digest) * 8
    if not 0 <= bits <= total:
        raise ValueError(f"cannot take {bits} most significant bits of a {total}-bit digest")
    return int.from_bytes(digest, "big") >> (total - bits)


def hash_down(key: bytes, steps: int) -> bytes:
    """Apply ``H`` ``steps`` times."""
    for _ in range(steps):
        key = hashlib.sha256(_STEP + key).digest()
    return key


def check_key(key: bytes, what: str = "key") -> bytes:
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        size = len(key) if isinstance(key, bytes | bytearray) else type(key).__name__
        raise ValueError(f"{what} must be {KEY_BYTES} bytes, got {size}")
    return key


# --- index of pebbles ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PebbleIndex:
    """``K_(top - k*spacing)`` for ``k = 1 .. (top-1) // spacing``, concatenated in ``keys``.

    Built once (``build_index``, O(top) hashes) and stored sealed; it lets a traversal start at
    any position with at most ``3 * spacing`` hashes. Its size is ``32 * (top-1) // spacing``
    bytes: 15 keys (480 B) for 2^20 epochs, 255 (8 KiB) for 2^24, 65,535 (2 MiB) for 2^32.
    """

    top: int
    spacing: int
    keys: bytes
    #: Optional landmarks for the schedule: ``units[k-1]`` is the number of ticks before epoch
    #: ``top - k*spacing`` begins, under the m schedule whose tag is ``units_tag``.
    units: tuple[int, ...] = ()
    units_tag: bytes = b""

    def __post_init__(self) -> None:
        if not 1 <= self.top <= MAX_CHAIN_LENGTH:
            raise ValueError(f"index top must be in 1..{MAX_CHAIN_LENGTH}, got {self.top}")
        if self.spacing < 2 or self.spacing & (self.spacing - 1):
            raise ValueError(f"index spacing must be a power of two >= 2, got {self.spacing}")
        expected = (self.top - 1) // self.spacing * KEY_BYTES
        if len(self.keys) != expected:
            raise ValueError(
                f"an index of a {self.top}-key chain every {self.spacing} keys holds "
                f"{expected} bytes, got {len(self.keys)}"
            )
        if self.units and len(self.units) != self.count:
            raise ValueError(f"an index of {self.count} keys has {len(self.units)} landmarks")

    @property
    def count(self) -> int:
        return len(self.keys) // KEY_BYTES

    def at(self, position: int) -> bytes | None:
        """The key at ``position`` (counted down from the top) if the index holds it."""
        if position % self.spacing:
            return None
        k = position // self.spacing
        if not 1 <= k <= self.count:
            return None
        return self.keys[(k - 1) * KEY_BYTES : k * KEY_BYTES]

    def floor(self, position: int) -> tuple[int, bytes] | None:
        """The index key at the largest indexed position ``<= position``, if any."""
        k = min(position // self.spacing, self.count)
        if k < 1:
            return None
        return k * self.spacing, self.keys[(k - 1) * KEY_BYTES : k * KEY_BYTES]


Progress = Callable[[int, int], None]
#: ``units(epoch, K_epoch)``: the length of an epoch in ticks (``migrate.schedule``).
Units = Callable[[int, bytes], int]


def build_index(
    top_key: bytes,
    top: int,
    spacing: int = DEFAULT_INDEX_SPACING,
    progress: Progress | None = None,
    units: Units | None = None,
    units_tag: bytes = b"",
) -> PebbleIndex:
    """Hash the whole chain down from ``K_top`` once and keep every ``spacing``-th key.

    With ``units``, also the landmarks: ticks before each index epoch begins (this walks the
    chain down to ``K_1``, every epoch's length). ``progress(done, total)`` is called every
    ``spacing`` hashes.
    """
    check_key(top_key, "chain key")
    count = (top - 1) // spacing if top >= 1 else 0
    blocks = (top - 1 + spacing - 1) // spacing if units is not None else count
    parts: list[bytes] = []
    after: list[int] = []  # ticks of the epochs from each index epoch to the top
    total = 0
    key = top_key
    step = hashlib.sha256
    epoch = top
    for k in range(blocks):
        for _ in range(min(spacing, epoch - 1)):
            if units is not None:
                total += units(epoch, key)
            key = step(_STEP + key).digest()
            epoch -= 1
        if k < count:
            parts.append(key)
            after.append(total)
        if progress is not None:
            progress(k + 1, blocks)
    landmarks: tuple[int, ...] = ()
    if units is not None:
        total += units(1, key)  # the walk ended at K_1
        # Ticks before epoch e = all ticks - ticks of epochs e..top.
        landmarks = tuple(
            total - (ticks + units(top - (k + 1) * spacing, parts[k]))
            for k, ticks in enumerate(after)
        )
    return PebbleIndex(top, spacing, b"".join(parts), landmarks, units_tag if units else b"")


# --- traversal ----------------------------------------------------------------------------


class _Counter:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0


class _Traversal:
    """The fractal traversal of positions ``0 .. top-1`` below the top key ``K_top``."""

    __slots__ = ("counter", "cursor_key", "index", "jobs", "position", "ready", "top")

    def __init__(
        self, top_key: bytes, top: int, index: PebbleIndex | None, counter: _Counter
    ) -> None:
        if index is not None and index.top != top:
            raise ValueError(f"the index is for a chain topped at {index.top}, not {top}")
        self.top = top
        self.index = index
        self.counter = counter
        #: The cursor's position, or None before the first seek.
        self.position: int | None = None
        self.cursor_key = top_key
        #: Finished pebbles, position -> key; position 0 is the top key and is never dropped.
        self.ready: dict[int, bytes] = {0: top_key}
        #: Running jobs, target position -> (position reached, key there).
        self.jobs: dict[int, tuple[int, bytes]] = {}

    @property
    def top_key(self) -> bytes:
        return self.ready[0]

    def key_count(self) -> int:
        extra = 0 if self.position is None or self.position in self.ready else 1
        return len(self.ready) + len(self.jobs) + extra

    def _sources(self) -> dict[int, bytes]:
        sources = dict(self.ready)
        for position, key in self.jobs.values():
            sources[position] = key
        if self.position is not None:
            sources[self.position] = self.cursor_key
        return sources

    def _floor(self, sources: dict[int, bytes], known: list[int], position: int) -> int:
        """The nearest position ``<= position`` with a key in ``sources`` or the index."""
        best = known[bisect_right(known, position) - 1]
        if self.index is not None:
            found = self.index.floor(position)
            if found is not None and found[0] > best:
                best = found[0]
                sources[best] = found[1]
                known.insert(bisect_right(known, best), best)
        return best

    def _derive(self, positions: Iterable[int], sources: dict[int, bytes]) -> dict[int, bytes]:
        """Keys at ``positions``, each hashed down from the nearest key known above it."""
        known = sorted(sources)
        result: dict[int, bytes] = {}
        last = -1
        last_key = b""
        for position in sorted(set(positions)):
            start = self._floor(sources, known, position)
            key = sources[start]
            if start < last <= position:
                start, key = last, last_key
            steps = position - start
            self.counter.value += steps
            key = hash_down(key, steps)
            result[position] = key
            last, last_key = position, key
        return result

    def key(self, position: int) -> bytes:
        """The key at ``position`` by random access; nothing moves."""
        return self._derive((position,), self._sources())[position]

    def setup(self, target: int, sources: dict[int, bytes] | None = None) -> None:
        """Put the cursor at ``target`` with the pebbles and jobs that position calls for.

        Keys come from ``sources`` (default: the keys held now), the index and hashing. A job
        that the keys held already put further along than its schedule stays there (ahead), so
        a backward seek costs the distance moved, not a job's restart.
        """
        if sources is None:
            sources = self._sources()
        sources.setdefault(0, self.top_key)
        known = sorted(sources)
        index = self.index
        ready: set[int] = set()
        jobs: dict[int, int] = {}  # target -> position the job must have reached
        for c, low, period in _pebbles_at(target):
            if c in sources or (index is not None and index.at(c) is not None):
                ready.add(c)
                continue
            done = min(low, 2 * (c + period - target + 1))
            reached = max(c - low + done, self._floor(sources, known, c))
            if reached == c:
                ready.add(c)
            else:
                jobs[c] = reached
        keys = self._derive([*ready, *jobs.values(), target], sources)
        self.ready = {0: self.top_key}
        for c in ready:
            self.ready[c] = keys[c]
        self.jobs = {c: (reached, keys[reached]) for c, reached in jobs.items()}
        self.position = target
        self.cursor_key = keys[target]

    def advance(self) -> bytes:
        """Move the cursor from position ``d`` to ``d - 1``: at most 2 hashes per level + 1."""
        d = self.position
        assert d is not None
        assert d >= 1
        e = d - 1
        ready = self.ready
        ready.pop(d, None)  # passed: d >= 1, so never the top
        hashes = 0
        jobs = self.jobs
        if jobs:
            for target, (was, job_key) in list(jobs.items()):
                steps = min(2, target - was)
                partial = job_key
                for _ in range(steps):
                    partial = hashlib.sha256(_STEP + partial).digest()
                hashes += steps
                if was + steps == target:
                    ready[target] = partial
                    del jobs[target]
                else:
                    jobs[target] = (was + steps, partial)
        if e and not e & 1:
            low = e & -e
            c = e - (low << 1)
            if c > 0 and c not in ready and c not in jobs:
                indexed = self.index.at(c) if self.index is not None else None
                if indexed is not None:
                    ready[c] = indexed
                else:
                    key = ready[c - low]
                    steps = min(2, low)
                    for _ in range(steps):
                        key = hashlib.sha256(_STEP + key).digest()
                    hashes += steps
                    if steps == low:
                        ready[c] = key
                    else:
                        jobs[c] = (c - low + steps, key)
        cursor = ready.get(e)
        if cursor is None:
            cursor = hashlib.sha256(_STEP + ready[e - 1]).digest()
            hashes += 1
        self.counter.value += hashes
        self.position = e
        self.cursor_key = cursor
        return cursor


class KeyChain:
    """The keys ``K_1 .. K_t`` reachable from the held key ``K_t``."""

    __slots__ = ("_counter", "_held_index", "_held_key", "_next", "_walk")

    def __init__(self, key: bytes, index: int, chain_index: PebbleIndex | None = None) -> None:
        check_key(key, "chain key")
        if not 1 <= index <= MAX_CHAIN_LENGTH:
            raise ValueError(f"key index must be in 1..{MAX_CHAIN_LENGTH}, got {index}")
        self._held_index = index
        self._held_key = key
        self._counter = _Counter()
        #: The traversal below the top it was set up from (the held key unless extended since).
        self._walk = _Traversal(key, index, chain_index, self._counter)
        #: After an extension: the traversal below the new top, set up at ``_walk.top + 1``.
        self._next: _Traversal | None = None

    @property
    def hashes(self) -> int:
        """Number of hash-chain steps computed so far (for benchmarks and tests)."""
        return self._counter.value

    @hashes.setter
    def hashes(self, value: int) -> None:
        self._counter.value = value

    @property
    def held_index(self) -> int:
        """``t``: the index of the most recent key held."""
        return self._held_index

    @property
    def held_key(self) -> bytes:
        return self._held_key

    @property
    def cursor(self) -> int:
        walk = self._walk
        return self._held_index if walk.position is None else walk.top - walk.position

    @property
    def pebble_count(self) -> int:
        """Keys held for the traversal (the index, if any, is not counted: see ``index_keys``)."""
        count = self._walk.key_count()
        if self._next is not None:
            count += self._next.key_count()
        elif self._walk.top != self._held_index:
            count += 1  # pragma: no cover - an extension always sets up ``_next``
        return count

    @property
    def index_keys(self) -> int:
        index = self._walk.index
        return 0 if index is None else index.count

    @property
    def index(self) -> PebbleIndex | None:
        """The pebble index below the held key, if the chain was given one."""
        index = self._walk.index
        return index if index is not None and index.top == self._held_index else None

    def _check_index(self, index: int) -> None:
        if index < 1:
            raise ValueError(f"epoch index must be at least 1, got {index}")
        if index > self._held_index:
            raise KeyNotHeldError(
                f"key for epoch {index} is not held (keys are held up to epoch {self._held_index})"
            )

    def key(self, index: int) -> bytes:
        """``K_index`` by random access; the cursor does not move."""
        self._check_index(index)
        walk = self._walk
        if index > walk.top:
            assert self._next is not None
            walk = self._next
        return walk.key(walk.top - index)

    def seek(self, index: int) -> bytes:
        """Move the cursor to ``index`` and return ``K_index``.

        One epoch forward costs at most ``2 log2(t) + 3`` hashes. A jump sets up the new position
        from the keys held (and the index): a backward move costs the distance moved, a forward
        jump at most the distance to the top key or, with an index, ``3 * spacing``.
        """
        self._check_index(index)
        if index > self._walk.top:
            assert self._next is not None
            self._walk, self._next = self._next, None
        walk = self._walk
        target = walk.top - index
        if walk.position is None:
            walk.setup(target, {0: walk.top_key})
        elif target == walk.position - 1:
            walk.advance()
        elif target != walk.position:
            walk.setup(target)
        return walk.cursor_key

    def advance(self) -> tuple[int, bytes]:
        """Move the cursor one epoch forward; returns ``(index, key)``."""
        index = self.cursor + 1
        return index, self.seek(index)

    def extend(self, key: bytes, index: int, max_steps: int) -> bool:
        """Accept ``K_index`` for a later epoch if hashing it down reaches the key held.

        Returns True if the held key changed. An extension to an epoch at or before the one held
        is accepted as a no-op only if it is consistent. ``max_steps`` bounds the work a hostile
        claim can cause (normally the chain length).
        """
        check_key(key, "extension key")
        held_index = self._held_index
        if index < 1:
            raise InvalidKeyExtensionError(f"key extension to epoch {index} is not a chain index")
        if index <= held_index:
            if not hmac.compare_digest(self.key(index), key):
                raise InvalidKeyExtensionError(
                    f"key for epoch {index} does not match the chain already held"
                )
            return False
        if index - held_index > max_steps:
            raise InvalidKeyExtensionError(
                f"key extension from epoch {held_index} to {index} exceeds the chain length"
            )
        if self._walk.position is None:
            # Nothing set up yet: verify, then start over below the new top.
            self._verify(key, index - held_index)
            self._walk = _Traversal(key, index, None, self._counter)
            self._next = None
        else:
            self._next = self._prepare_next(key, index)
        self._held_index, self._held_key = index, key
        return True

    def _verify(self, key: bytes, steps: int) -> None:
        self._counter.value += steps
        if not hmac.compare_digest(hash_down(key, steps), self._held_key):
            raise InvalidKeyExtensionError(
                f"key for epoch {self._held_index + steps} does not hash down to the key held "
                f"for epoch {self._held_index}"
            )

    def _prepare_next(self, key: bytes, index: int) -> _Traversal:
        """The traversal below ``K_index``, set up where the current one ends (``_walk.top+1``).

        Its pebbles down to the held key come from the walk that verifies the extension; any
        beyond it (a previous extension not reached yet) from that extension's keys.
        """
        gap = index - self._held_index
        sources = {0: key}
        following = _Traversal(key, index, None, self._counter)
        walk_end = index - (self._walk.top + 1)
        # Verify first, with the same hashes that give the pebbles above the held key.
        probe = _Traversal(key, index, None, _Counter())
        needed = _setup_positions(probe, walk_end, gap)
        keys = following._derive([*needed, gap], sources)
        if not hmac.compare_digest(keys[gap], self._held_key):
            raise InvalidKeyExtensionError(
                f"key for epoch {index} does not hash down to the key held "
                f"for epoch {self._held_index}"
            )
        sources.update(keys)
        if self._next is not None:
            shift = index - self._next.top
            for position, pebble in self._next._sources().items():
                sources[position + shift] = pebble
        following.setup(walk_end, sources)
        return following


def _pebbles_at(target: int) -> Iterator[tuple[int, int, int]]:
    """``(position, low, period)`` of every pebble (held or moving) that a cursor at ``target``
    has: per level ``low = 2**level``, the newest two pebbles of period ``2 * low`` that have
    started (a pebble at ``c`` starts at ``c + period`` and is done ``low`` positions later)."""
    level = 1
    while (1 << level) <= target:
        low = 1 << level
        period = low << 1
        newest = (target - low) // period * period + low
        for c in (newest, newest - period):
            if c >= low and c + period >= target:
                yield c, low, period
        level += 1


def _setup_positions(walk: _Traversal, target: int, limit: int) -> list[int]:
    """Positions ``<= limit`` whose keys ``walk.setup(target)`` may need (cheap superset)."""
    positions = [target] if target <= limit else []
    for c, low, _period in _pebbles_at(target):
        positions.extend(p for p in (c, c - low) if p <= limit)
    return positions
