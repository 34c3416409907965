"""systemd units of the shims: ``roam server install`` and ``roam client install``.

Theory of operation: a unit is written only where systemd runs (``systemctl`` is looked for
before anything is written) and taken back, with whatever directory was made for it, if
``systemctl`` then fails. The server's unit runs ``roam server --config FILE`` under the
hardening the shim tolerates: a capability bounding set of what it uses (nftables, TCP_REPAIR,
IP_TRANSPARENT, entering namespaces to sweep dead instances, low ports, tcpdump for
``--capture-dropped``), a read-only file system except the run directory and the directories it
writes (state, log, status, captures), a private /tmp and no new privileges. Not set, because
the shim needs them: ProtectKernelTunables (it writes net sysctls), ProtectKernelModules
(nftables loads its modules on demand), PrivateNetwork (it serves the host's network; use
``NetworkNamespacePath=`` to run it in a namespace).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

from migrate.errors import ConfigError
from migrate.kernel.files import PUBLIC_FILE, private_directory, write_private

SYSTEMD_DIR = Path("/etc/systemd/system")
RUN_DIRECTORY = "server-roaming"  # /run/server-roaming: instance records, client status files

SERVER_CAPABILITIES = (
    "CAP_NET_ADMIN",  # nftables, TCP_REPAIR, IP_TRANSPARENT, ip rules and routes
    "CAP_NET_RAW",  # raw sockets; tcpdump on the NFLOG group (--capture-dropped)
    "CAP_NET_BIND_SERVICE",  # a service port below 1024
    "CAP_SYS_ADMIN",  # setns into a dead instance's namespace (the start-up sweep)
    "CAP_SETUID",  # tcpdump -Z root (--capture-dropped)
    "CAP_SETGID",
)


def roam_executable() -> str:
    found = shutil.which("roam")
    return found or f"{sys.executable} -m roam_cli.main"


def server_unit_name(listen: str) -> str:
    address, _, port = listen.rpartition(":")
    return f"roam-server-{address.strip('[]').replace(':', '_')}-{port}.service"


# systemd would read a space, quote, backslash, "%" (a specifier) or "$" in a path as
# syntax, and a newline as a new setting: such paths are refused, not quoted.
_UNSAFE = frozenset(" \t\n\r\"'\\%$;")
_NETNS_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _check_path(path: Path) -> None:
    if _UNSAFE.intersection(str(path)):
        raise ConfigError(f"{str(path)!r}: a path in a unit may not hold spaces, quotes, %, $ or ;")


def server_unit_text(
    config: Path,
    roam: str,
    listen: str,
    writable: Iterable[Path],
    netns: str | None = None,
) -> str:
    writable = sorted(set(writable))
    for path in (config, *writable):
        _check_path(path)
    if netns is not None and not _NETNS_NAME.fullmatch(netns):
        raise ConfigError(f"--netns {netns!r}: a namespace name is letters, digits, _ . -")
    paths = " ".join(str(path) for path in writable)
    namespace = ""
    if netns is not None:
        namespace = (
            f"# In network namespace {netns} (it must exist before the unit starts).\n"
            f"NetworkNamespacePath=/run/netns/{netns}\n"
        )
    return f"""[Unit]
Description=server-roaming server shim ({listen})
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
ExecStart={roam} server --config {config}
# Leftovers of dead instances only (a live shim's tables are never touched).
ExecStopPost={roam} cleanup
ExecReload=/bin/kill -HUP $MAINPID
Restart=on-failure
RestartSec=2
{namespace}# Status, log and state files name the active server: nobody else may read them.
UMask=0077
RuntimeDirectory={RUN_DIRECTORY}
RuntimeDirectoryMode=0700
RuntimeDirectoryPreserve=yes
CapabilityBoundingSet={" ".join(SERVER_CAPABILITIES)}
NoNewPrivileges=yes
ProtectSystem=strict
ReadWritePaths={paths}
ProtectHome=read-only
PrivateTmp=yes
PrivateDevices=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictAddressFamilies=AF_INET AF_INET6 AF_NETLINK AF_UNIX AF_PACKET
RestrictNamespaces=net
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
SystemCallArchitectures=native

[Install]
WantedBy=multi-user.target
"""


def _systemctl(*args: str) -> None:
    result = subprocess.run(["systemctl", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        line = (result.stderr.strip().splitlines() or ["failed"])[0]
        raise ConfigError(f"systemctl {' '.join(args)}: {line}")


def require_systemctl(what: str) -> None:
    """Checked before anything is written, so that a host without systemd keeps nothing."""
    if shutil.which("systemctl") is None:
        raise ConfigError(f"systemctl is not available on this host; {what}")


def install_unit(
    unit_dir: Path,
    name: str,
    text: str,
    *,
    no_start: bool,
    uninstall_hint: str,
    directories: Iterable[Path] = (),
) -> None:
    """Write ``unit_dir/name`` (and the missing ``directories`` it writes to, 0700), enable and
    start it; if ``systemctl`` fails, take back the unit and the directories made here."""
    unit = unit_dir / name
    if unit.exists():
        raise ConfigError(f"{unit} already exists; run '{uninstall_hint}' first")
    if not no_start:
        require_systemctl("nothing written (--no-start writes the unit only)")
    made: list[Path] = []
    for directory in directories:
        missing = [d for d in (directory, *directory.parents) if not d.exists()]
        private_directory(directory)
        made += missing
    unit_dir.mkdir(parents=True, exist_ok=True)
    # A unit file is public (systemd reads it as any user's units are read): 0644, atomic.
    write_private(unit, text, PUBLIC_FILE)
    print(f"wrote {unit}")
    if no_start:
        return
    try:
        _systemctl("daemon-reload")
        _systemctl("enable", "--now", unit.name)
    except ConfigError as error:
        # Leave nothing behind: the unit goes, and systemd forgets it.
        unit.unlink()
        for directory in made:  # deepest first; only if still empty
            try:
                directory.rmdir()
            except OSError:
                break
        subprocess.run(["systemctl", "daemon-reload"], capture_output=True, check=False)
        raise ConfigError(f"{error}; {unit} removed") from None
    print(f"started {unit.name}")


def uninstall_units(units: list[Path]) -> None:
    systemd = shutil.which("systemctl") is not None
    for unit in units:
        if systemd:
            subprocess.run(
                ["systemctl", "disable", "--now", unit.name], capture_output=True, check=False
            )
        unit.unlink()
        print(f"removed {unit}")
    if systemd:
        subprocess.run(["systemctl", "daemon-reload"], capture_output=True, check=False)
