"""Kernel adapters (TCP_REPAIR, nftables, NFQUEUE, sock_diag): the one I/O part of ``migrate``."""
