"""nftables adapter shared by the two shims: one table per instance, replaced atomically.

Theory of operation (sshuttle's lesson, see docs/operations-kernel.md): a shim builds its whole
ruleset as plain text and hands it to ``nft -f -`` as one transaction, so the kernel holds either
the old table or the new one, never half of each; a broken script changes nothing. Tearing an
instance down is one ``delete table``. Tables are named ``roam_<role>_<pid>`` after the owning
process, so ``roam cleanup`` can find the tables of dead instances even when their record is lost.

Every function takes ``netns``: ``None`` acts in the caller's network namespace (the shims run
whole daemons inside a namespace, so this is the usual case); a bare name runs ``nft`` under
``ip netns exec NAME``; a path (``/proc/PID/ns/net``, ``/run/netns/NAME``) runs it under
``nsenter --net=PATH``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from typing import Any, Final

from migrate.errors import ConfigError, LocalError
from migrate.kernel import libnft, nftsets
from migrate.kernel.fdreserve import RESERVE

NFT_TIMEOUT_S: Final = 30.0
FAMILIES: Final = frozenset({"ip", "ip6", "inet", "arp", "bridge", "netdev"})
TABLE_PREFIX: Final = "roam"

# nft identifiers: a letter or underscore, then letters, digits, underscores (kept strict so a
# name can never inject syntax into a generated script).
_IDENTIFIER: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_ROLE: Final = re.compile(r"^[a-z]{2,8}$")
_INSTANCE_TABLE: Final = re.compile(r"^roam_(?P<role>[a-z]{2,8})_(?P<pid>[1-9][0-9]{0,9})$")
# "/dev/stdin:7:69-69: Error: syntax error, ..." or "Error: Could not process rule: ..."
_ERROR_LINE: Final = re.compile(
    r"^(?:(?P<source>[^:\s]+):(?P<line>\d+):[\d-]+: )?Error: (?P<msg>.+)$"
)

NftValue = str | int | tuple["NftValue", ...]


class NftError(LocalError):
    """``nft`` refused a command or script; the message says what was tried and why it failed."""


# --- naming -------------------------------------------------------------------------------


def check_family(family: str) -> str:
    if family not in FAMILIES:
        raise ConfigError(
            f"invalid nftables family {family!r}: use one of {', '.join(sorted(FAMILIES))}"
        )
    return family


def check_identifier(name: str, what: str = "table") -> str:
    if not isinstance(name, str) or not _IDENTIFIER.match(name):
        raise ConfigError(
            f"invalid nftables {what} name {name!r}: use a letter or _, then up to 63 "
            "letters, digits or _"
        )
    return name


def instance_table_name(role: str, pid: int) -> str:
    """The table of the instance of ``role`` (``srv``, ``cli``, ...) run by process ``pid``."""
    if not isinstance(role, str) or not _ROLE.match(role):
        raise ConfigError(f"invalid instance role {role!r}: use 2 to 8 lowercase letters")
    if isinstance(pid, bool) or not isinstance(pid, int) or not 0 < pid < 10**10:
        raise ConfigError(f"invalid pid {pid!r} for an instance table name")
    return f"{TABLE_PREFIX}_{role}_{pid}"


def parse_instance_table_name(name: str) -> tuple[str, int] | None:
    """``(role, pid)`` if ``name`` follows ``instance_table_name``, else ``None``.

    Lab tables (``roam_<pid>_<token>``) and anything else do not match.
    """
    match = _INSTANCE_TABLE.match(name)
    if match is None:
        return None
    return match["role"], int(match["pid"])


# --- scripts ------------------------------------------------------------------------------


def replace_table_script(family: str, name: str, body: str) -> str:
    """A script that atomically (re)creates table ``family name`` with ``body`` as its contents.

    ``add table`` first makes ``delete table`` valid when the table does not exist yet, so the
    same script serves the first apply and every later one; all three run in one transaction.
    """
    check_family(family)
    check_identifier(name)
    inner = body.strip("\n")
    return (
        f"add table {family} {name}\n"
        f"delete table {family} {name}\n"
        f"table {family} {name} {{\n{inner}\n}}\n"
    )


def delete_table_script(family: str, name: str) -> str:
    """A script that deletes the table whether or not it exists (never fails on absence)."""
    check_family(family)
    check_identifier(name)
    return f"add table {family} {name}\ndelete table {family} {name}\n"


def first_error(stderr: str) -> str:
    """The first meaningful line of nft's stderr, with the script line number if it gave one."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in lines:
        match = _ERROR_LINE.match(line)
        if match is not None:
            where = f" (script line {match['line']})" if match["line"] else ""
            return match["msg"].strip() + where
    return lines[0] if lines else "no error message"


# --- running nft --------------------------------------------------------------------------


def _netns_argv(netns: str | None) -> list[str]:
    if netns is None:
        return []
    if "/" in netns:
        return ["nsenter", f"--net={netns}", "--"]
    return ["ip", "netns", "exec", netns]


def _run(
    args: Sequence[str], *, what: str, netns: str | None, script: str | None = None
) -> subprocess.CompletedProcess[str]:
    if shutil.which("nft") is None:
        raise NftError(f"{what}: nft not found (install the nftables package)")
    argv = [*_netns_argv(netns), "nft", *args]
    try:
        completed = subprocess.run(
            argv,
            input=script,
            stdin=None if script is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=NFT_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise NftError(f"{what}: nft did not finish within {NFT_TIMEOUT_S:g} s") from None
    except OSError as error:
        raise NftError(f"{what}: cannot run {argv[0]}: {error.strerror or error}") from None
    return completed


def _check(completed: subprocess.CompletedProcess[str], what: str) -> None:
    if completed.returncode != 0:
        reason = first_error(completed.stderr)
        if "Operation not permitted" in reason:
            reason += " (needs CAP_NET_ADMIN: run as root)"
        raise NftError(f"{what}: {reason}")


def nft_available() -> str | None:
    """``None`` if nft can be used here, else one line saying why not and how to fix it."""
    if shutil.which("nft") is None:
        return "nft not found: install the nftables package"
    try:
        completed = _run(["list", "tables"], what="listing tables", netns=None)
    except NftError as error:
        return str(error)
    if completed.returncode != 0:
        reason = first_error(completed.stderr)
        if "Operation not permitted" in reason or "Permission denied" in reason:
            return f"nft list tables: {reason}: needs CAP_NET_ADMIN (run as root)"
        return f"nft list tables: {reason}"
    return None


def apply(script: str, *, netns: str | None = None, what: str = "applying an nft script") -> None:
    """Run ``script`` with ``nft -f -`` as one transaction: all of it takes effect, or none.

    In the caller's own namespace through libnftables when it is there (no program started:
    the hand-overs' rule changes sit inside the pause the application sees), else ``nft``.
    ``ROAM_NFT_PROGRAM=1`` forces the program. A daemon's reserved descriptors are free for
    it (``fdreserve``: a daemon at its open-file limit can still change its rules)."""
    with RESERVE.released():
        if netns is None and libnft.available():
            try:
                status, errors = libnft.run(script)
            except OSError as error:  # no descriptor for the script (the open-file limit)
                raise NftError(f"{what}: {error.strerror or error}") from None
            _check(subprocess.CompletedProcess(["libnftables"], status, "", errors), what)
            return
        _check(_run(["-f", "-"], what=what, netns=netns, script=script), what)


def apply_changes(
    family: str,
    table: str,
    changes: Sequence[nftsets.Change],
    *,
    netns: str | None = None,
    what: str = "changing set elements",
) -> None:
    """Element changes to one table (``nftsets``) as one transaction: over netlink in the
    caller's own namespace (a hand-over's freeze and switch, inside the pause), else as the
    equivalent script. ``ROAM_NFT_PROGRAM=1`` forces the program, as for ``apply``."""
    check_family(family)
    check_identifier(table)
    if netns is not None or os.environ.get("ROAM_NFT_PROGRAM") == "1":
        apply(nftsets.script(family, table, changes), netns=netns, what=what)
        return
    try:
        if not nftsets.WRITER.is_open:  # kept open after: no descriptor to find in a pause
            with RESERVE.released():
                nftsets.WRITER.open()
        nftsets.WRITER.apply(family, table, changes)
    except nftsets.NftSetError as error:
        raise NftError(f"{what} in table {family} {table}: {error}") from None


def replace_table(family: str, name: str, body: str, *, netns: str | None = None) -> None:
    """Atomically (re)create table ``family name`` with ``body``."""
    apply(
        replace_table_script(family, name, body),
        netns=netns,
        what=f"replacing table {family} {name}",
    )


def delete_table(
    family: str, name: str, *, missing_ok: bool = True, netns: str | None = None
) -> bool:
    """Delete a table; ``True`` if it existed. A missing table is an error unless ``missing_ok``."""
    check_family(family)
    check_identifier(name)
    what = f"deleting table {family} {name}"
    completed = _run(["delete", "table", family, name], what=what, netns=netns)
    if completed.returncode != 0:
        if missing_ok and "No such file or directory" in completed.stderr:
            return False
        _check(completed, what)
    return True


def _json(args: Sequence[str], *, what: str, netns: str | None) -> list[dict[str, Any]]:
    completed = _run(["-j", *args], what=what, netns=netns)
    _check(completed, what)
    try:
        document = json.loads(completed.stdout)
        items = document["nftables"]
    except (ValueError, KeyError, TypeError):
        raise NftError(f"{what}: nft printed no JSON ruleset") from None
    if not isinstance(items, list):
        raise NftError(f"{what}: nft printed no JSON ruleset")
    return [item for item in items if isinstance(item, dict)]


def list_tables(*, netns: str | None = None) -> list[tuple[str, str]]:
    """Every table in the namespace as ``(family, name)``."""
    items = _json(["list", "tables"], what="listing tables", netns=netns)
    return parse_tables(items)


def table_exists(family: str, name: str, *, netns: str | None = None) -> bool:
    return (family, name) in list_tables(netns=netns)


def table_json(family: str, name: str, *, netns: str | None = None) -> list[dict[str, Any]]:
    """The ``nftables`` list of ``nft -j list table family name`` (metainfo, table, sets, ...)."""
    check_family(family)
    check_identifier(name)
    return _json(
        ["list", "table", family, name], what=f"reading table {family} {name}", netns=netns
    )


def counters(family: str, name: str, *, netns: str | None = None) -> dict[str, tuple[int, int]]:
    """Named counters of a table: ``{counter: (packets, bytes)}``."""
    return parse_counters(table_json(family, name, netns=netns))


def set_elements(
    family: str, table: str, set_name: str, *, netns: str | None = None
) -> list[NftValue]:
    """Elements of a named set (see ``normalize_value`` for their form)."""
    check_family(family)
    check_identifier(table)
    check_identifier(set_name, "set")
    items = _json(
        ["list", "set", family, table, set_name],
        what=f"reading set {set_name} of table {family} {table}",
        netns=netns,
    )
    return parse_set_elements(items, set_name)


def map_elements(
    family: str, table: str, map_name: str, *, netns: str | None = None
) -> dict[NftValue, NftValue]:
    """Elements of a named map as ``{key: value}``."""
    check_family(family)
    check_identifier(table)
    check_identifier(map_name, "map")
    items = _json(
        ["list", "map", family, table, map_name],
        what=f"reading map {map_name} of table {family} {table}",
        netns=netns,
    )
    return parse_map_elements(items, map_name)


# --- JSON parsing (pure) ------------------------------------------------------------------


def parse_tables(items: list[dict[str, Any]]) -> list[tuple[str, str]]:
    tables = []
    for item in items:
        table = item.get("table")
        if isinstance(table, dict):
            family, name = table.get("family"), table.get("name")
            if isinstance(family, str) and isinstance(name, str):
                tables.append((family, name))
    return tables


def parse_counters(items: list[dict[str, Any]]) -> dict[str, tuple[int, int]]:
    found = {}
    for item in items:
        counter = item.get("counter")
        if isinstance(counter, dict) and isinstance(counter.get("name"), str):
            found[counter["name"]] = (int(counter.get("packets", 0)), int(counter.get("bytes", 0)))
    return found


def normalize_value(value: Any) -> NftValue:
    """One element or key of nft's JSON as plain Python.

    Addresses and names stay strings, ports and numbers ints; a concatenation becomes a tuple;
    a prefix becomes ``"addr/len"`` and a range ``"low-high"`` (nft's own notation); an element
    with a timeout or counter (``{"elem": {"val": ...}}``) becomes its value.
    """
    if isinstance(value, bool):
        raise NftError(f"unexpected value in nft JSON: {value!r}")
    if isinstance(value, str | int):
        return value
    if isinstance(value, dict):
        if "concat" in value:
            return tuple(normalize_value(part) for part in value["concat"])
        if "prefix" in value:
            prefix = value["prefix"]
            return f"{prefix['addr']}/{prefix['len']}"
        if "range" in value:
            low, high = value["range"]
            return f"{normalize_value(low)}-{normalize_value(high)}"
        if "elem" in value:
            return normalize_value(value["elem"]["val"])
    raise NftError(f"unexpected value in nft JSON: {value!r}")


def _named(items: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    for item in items:
        obj = item.get(kind)
        if isinstance(obj, dict) and obj.get("name") == name:
            return obj
    raise NftError(f"nft listed no {kind} named {name}")


def parse_set_elements(items: list[dict[str, Any]], set_name: str) -> list[NftValue]:
    elements = _named(items, "set", set_name).get("elem", [])
    return [normalize_value(element) for element in elements]


def parse_map_elements(items: list[dict[str, Any]], map_name: str) -> dict[NftValue, NftValue]:
    found: dict[NftValue, NftValue] = {}
    for element in _named(items, "map", map_name).get("elem", []):
        if not isinstance(element, list) or len(element) != 2:
            raise NftError(f"unexpected map element in nft JSON: {element!r}")
        found[normalize_value(element[0])] = normalize_value(element[1])
    return found
