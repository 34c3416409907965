"""``roam client status`` and ``roam server status`` for people: the status file's JSON turned
into a short summary.

Times are shown relative to now ("ends in 3.2 s", "1.4 s ago"), the m schedule as "m = 3, then
2 from epoch 50", the last roams one per line. ``--json`` prints the file as it is.
"""

from __future__ import annotations

from typing import Any

# Servers send roaming updates every 2 s on average (``roam server --update-period``): a client
# that heard none for this long has been revoked, has expired, or reaches no server.
UPDATES_STALE_S = 30.0


def _ago(then: object, now: float) -> str:
    if not isinstance(then, int | float):
        return "never"
    return f"{max(0.0, now - then):.1f} s ago"


def _m_schedule(m: object) -> str:
    if not isinstance(m, dict) or not m:
        return str(m)
    items = sorted((int(epoch), value) for epoch, value in m.items())
    first = f"m = {items[0][1]}"
    later = ", ".join(f"{value} from epoch {epoch}" for epoch, value in items[1:])
    return f"{first}, then {later}" if later else first


def updates_warning(status: dict[str, Any], now: float) -> str | None:
    """Why the client may be cut off, when no roaming update came for a long time."""
    last = status.get("last_update")
    since = last if isinstance(last, int | float) else status.get("started")
    if not isinstance(since, int | float) or now - since < UPDATES_STALE_S:
        return None
    heard = "no roaming update" if last is None else "no roaming update since the last one"
    return (
        f"{heard} for {now - since:.0f} s: this client was revoked or its subscription "
        "expired (servers stop updating it and their gates drop it), or no server is reachable"
    )


def client_summary(status: dict[str, Any], now: float) -> list[str]:
    lines = [
        f"client {status.get('name')} (pid {status.get('pid')}), VIP {status.get('vip')}, "
        f"migration {status.get('migration')}",
    ]
    epoch, ends = status.get("epoch"), status.get("epoch_ends")
    if epoch is None:
        lines.append("epoch: not started yet")
    else:
        left = f", ends in {ends - now:.1f} s" if isinstance(ends, int | float) else ""
        lines.append(f"epoch {epoch} on {status.get('server')}{left}")
        k, members = status.get("active"), status.get("active_set")
        if isinstance(k, int) and k > 1 and isinstance(members, list):
            # k of N: the line above names this client's own server, drawn from the set.
            lines.append(
                f"k of N: {k} active servers ({', '.join(map(str, members))}); this "
                "client's server is drawn from them every epoch"
            )
    lines.append(f"keys held up to epoch {status.get('key_index')}; {_m_schedule(status.get('m'))}")
    offset = status.get("clock_offset")
    if isinstance(offset, int | float):
        lines.append(f"clock offset to the servers: {offset:+.3f} s")
    lines.append(
        f"updates: {status.get('updates_accepted', 0)} accepted (last "
        f"{_ago(status.get('last_update'), now)}), {status.get('updates_rejected', 0)} rejected"
    )
    if status.get("last_rejection"):
        lines.append(f"  last rejection: {status['last_rejection']}")
    warning = updates_warning(status, now)
    if warning:
        lines.append(f"WARNING: {warning}")
    live = status.get("live")
    if isinstance(live, dict):
        lines.append(f"connections tracked: {live.get('tracked_connections', 0)}")
        roams = live.get("roams") or []
        if roams:
            lines.append("last roams:")
        for roam in roams:
            outcomes = ", ".join(f"{k} {v}" for k, v in sorted(roam.get("outcomes", {}).items()))
            pause = roam.get("pause_ms")
            lines.append(
                f"  epoch {roam.get('epoch')} to {roam.get('server')}: "
                f"{roam.get('connections', 0)} connection(s) ({outcomes or 'none'}), "
                f"pause {'-' if pause is None else f'{pause:.1f} ms'}, "
                f"{roam.get('bytes_replayed', 0)} bytes replayed"
            )
    lines.append(f"status written {_ago(status.get('updated'), now)}")
    return lines


def _in(then: object, now: float) -> str:
    return f"in {then - now:.1f} s" if isinstance(then, int | float) else "not known"


def server_summary(status: dict[str, Any], now: float) -> list[str]:
    lines = [
        f"server {status.get('listen')} (pid {status.get('pid')}), service "
        f"{status.get('service')}, migration {status.get('migration')}",
    ]
    gate = "open" if status.get("open") else "closed"
    until = _in(status.get("gate_until"), now)
    if status.get("active"):
        leaves = status.get("leaves_at")
        lines.append(
            f"epoch {status.get('epoch')}: ACTIVE, gate {gate}; the service leaves "
            f"{_in(leaves, now) if leaves is not None else 'not within the keys held'}"
        )
    else:
        lines.append(f"epoch {status.get('epoch')}: inactive, gate {gate} (may change {until})")
    revoked = status.get("revoked") or []
    lines.append(
        f"connections: {status.get('connections', 0)}; clients: {status.get('clients', '?')} "
        f"(list generation {status.get('client_list_generation', '?')}), "
        f"{len(revoked)} revoked"
    )
    lines.append(
        f"updates sent: {status.get('updates_sent', 0)}; control messages rejected: "
        f"{status.get('control_rejected', 0)}"
    )
    live = status.get("live")
    if isinstance(live, dict):
        counts = ", ".join(
            f"{key.replace('_', ' ')} {value}"
            for key, value in live.items()
            if isinstance(value, int | float) and not isinstance(value, bool)
        )
        lines.append(f"live: {counts}")
    lines.append(f"status written {_ago(status.get('updated'), now)}")
    return lines
