"""Optional extras: commands that need one say which, in one line, before doing anything.

``pip install 'server-roaming[labs]'`` brings what the labs and experiments use (matplotlib for
figures, scapy to build and read packets); the shims need none of it. (rich, for progress bars
and ``status --watch``, is a dependency of the package.)
"""

from __future__ import annotations

import importlib.util

from migrate.errors import ConfigError

EXTRA_OF = {"matplotlib": "labs", "scapy": "labs"}


def _needs(extra: str, module: str) -> str:
    return (
        f"this command needs the '{extra}' extra (no module {module!r}): "
        f"pip install 'server-roaming[{extra}]'"
    )


def require(*modules: str) -> None:
    """Refuse, before anything is done, when one of ``modules`` is not installed."""
    for module in modules:
        if importlib.util.find_spec(module) is None:
            raise ConfigError(_needs(EXTRA_OF[module], module))


def missing_extra(error: ModuleNotFoundError) -> str | None:
    """The one-line message for an import of an optional extra's module; None for any other
    missing module (a bug, shown as such)."""
    top = (error.name or "").split(".", 1)[0]
    extra = EXTRA_OF.get(top)
    return None if extra is None else _needs(extra, top)
