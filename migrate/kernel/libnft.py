"""libnftables in-process: the same scripts as ``nft -f -``, without starting a program.

A hand-over changes the client's rules twice while the connection is frozen (freeze, then
switch); starting ``nft`` costs 8-17 ms each time on our machines, which the application sees
as pause. libnftables (Debian ``libnftables1``, installed with ``nftables``) parses and commits
the same script as one transaction in well under a millisecond.

Only for the caller's own network namespace; :mod:`migrate.kernel.nft` falls back to the
program when the library is missing or another namespace is asked for. One context per
process, used under a lock (a context is not thread-safe), created again after a fork.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from typing import Final

_NAMES: Final = ("libnftables.so.1", "nftables")
_CTX_DEFAULT: Final = 0


class _Library:
    def __init__(self, lib: ctypes.CDLL) -> None:
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_free.restype = None
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_output.restype = ctypes.c_int
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.restype = ctypes.c_int
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_run_cmd_from_filename.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_filename.restype = ctypes.c_int
        self.lib = lib
        self.lock = threading.Lock()
        self.ctx: int | None = None
        self.pid = -1

    def _context(self) -> int:
        if self.ctx is None or self.pid != os.getpid():
            ctx = self.lib.nft_ctx_new(_CTX_DEFAULT)
            if not ctx:
                raise OSError("nft_ctx_new failed")
            # Buffered: messages come back to us instead of going to our stdout/stderr.
            if self.lib.nft_ctx_buffer_output(ctx) or self.lib.nft_ctx_buffer_error(ctx):
                self.lib.nft_ctx_free(ctx)
                raise OSError("cannot buffer libnftables output")
            self.ctx, self.pid = ctx, os.getpid()
        return self.ctx

    def run(self, script: str) -> tuple[int, str]:
        with self.lock:
            ctx = self._context()
            # From a file, not nft_run_cmd_from_buffer: errors then name the script line, as
            # with the program (the buffer variant of libnftables 1.0.6 echoes a wrong line).
            fd = os.memfd_create("roam-nft", os.MFD_CLOEXEC)
            try:
                os.write(fd, script.encode())
                status = self.lib.nft_run_cmd_from_filename(ctx, f"/proc/self/fd/{fd}".encode())
            finally:
                os.close(fd)
            error = self.lib.nft_ctx_get_error_buffer(ctx) or b""
            return status, error.decode(errors="replace")


_library: _Library | None = None
_loaded = False
_load_lock = threading.Lock()


def _load() -> _Library | None:
    global _library, _loaded
    with _load_lock:
        if not _loaded:
            _loaded = True
            for name in _NAMES:
                path = ctypes.util.find_library(name) if "." not in name else name
                if path is None:
                    continue
                try:
                    _library = _Library(ctypes.CDLL(path))
                    break
                except (OSError, AttributeError):
                    continue
        return _library


def available() -> bool:
    """Whether libnftables can be used in this process."""
    return os.environ.get("ROAM_NFT_PROGRAM") != "1" and _load() is not None


def run(script: str) -> tuple[int, str]:
    """Run ``script`` as ``nft -f -`` would: (0, "") on success, else (non-zero, messages)."""
    library = _load()
    if library is None:
        raise OSError("libnftables is not available")
    return library.run(script)
