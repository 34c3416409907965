"""Linux socket option numbers and layouts that Python's ``socket`` module does not export.

Values are from ``include/uapi/linux/tcp.h`` and ``linux/sockios.h``; they are part of the
kernel ABI and never change. Struct formats use native byte order (``=``) because the kernel
reads and writes socket options in host order.
"""

import struct
from typing import Final

# --- TCP-level socket options (SOL_TCP) -----------------------------------------------------

TCP_INFO: Final = 11
TCP_MAXSEG: Final = 2
TCP_REPAIR: Final = 19
TCP_REPAIR_QUEUE: Final = 20
TCP_QUEUE_SEQ: Final = 21
TCP_REPAIR_OPTIONS: Final = 22
TCP_TIMESTAMP: Final = 24
TCP_REPAIR_WINDOW: Final = 29

# Values of TCP_REPAIR.
TCP_REPAIR_ON: Final = 1
TCP_REPAIR_OFF: Final = 0
# Leave repair mode without the window probe the kernel otherwise sends (Linux 4.14+).
TCP_REPAIR_OFF_NO_WP: Final = -1

# Values of TCP_REPAIR_QUEUE.
TCP_NO_QUEUE: Final = 0
TCP_RECV_QUEUE: Final = 1
TCP_SEND_QUEUE: Final = 2

# opt_code of struct tcp_repair_opt (the TCP option kinds of RFC 9293 / RFC 7323 / RFC 2018).
TCPOPT_MSS: Final = 2
TCPOPT_WINDOW: Final = 3
TCPOPT_SACK_PERM: Final = 4
TCPOPT_TIMESTAMP: Final = 8

# tcp_info.tcpi_options bits.
TCPI_OPT_TIMESTAMPS: Final = 1
TCPI_OPT_SACK: Final = 2
TCPI_OPT_WSCALE: Final = 4

# Largest window scale shift (RFC 7323 section 2.3); the kernel rejects more with EFBIG.
TCP_MAX_WSCALE: Final = 14

# tcp_info.tcpi_state value of an established connection.
TCP_ESTABLISHED: Final = 1
TCP_CLOSE: Final = 7

# --- ioctls (linux/sockios.h, asm-generic/ioctls.h) ------------------------------------------

SIOCINQ: Final = 0x541B  # FIONREAD: bytes in the receive queue not yet read
SIOCOUTQ: Final = 0x5411  # TIOCOUTQ: bytes in the send queue, sent or not, not yet acked
SIOCOUTQNSD: Final = 0x894B  # bytes in the send queue never sent

# --- IP level -----------------------------------------------------------------------------

IP_TRANSPARENT: Final = 19  # SOL_IP
IPV6_TRANSPARENT: Final = 75  # SOL_IPV6

# --- struct layouts -----------------------------------------------------------------------

U32: Final = struct.Struct("=I")
U64: Final = struct.Struct("=Q")
S32: Final = struct.Struct("=i")
# struct tcp_repair_opt { __u32 opt_code; __u32 opt_val; }
TCP_REPAIR_OPT: Final = struct.Struct("=II")
# struct tcp_repair_window { __u32 snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup; }
TCP_REPAIR_WINDOW_STRUCT: Final = struct.Struct("=IIIII")
# The head of struct tcp_info: tcpi_state, ca_state, retransmits, probes, backoff, options,
# the snd_wscale:4/rcv_wscale:4 bit-field byte, one more flags byte, then tcpi_rto, tcpi_ato,
# tcpi_snd_mss, tcpi_rcv_mss.
TCP_INFO_HEAD: Final = struct.Struct("=BBBBBBBBIIII")
# Offsets of later struct tcp_info fields (the struct only grows; check the returned length).
TCPI_ADVMSS: Final = 84
TCPI_BYTES_ACKED: Final = 120  # __u64, Linux 4.1
TCPI_BYTES_RECEIVED: Final = 128  # __u64, Linux 4.1
TCPI_BYTES_RECEIVED_END: Final = 136
TCPI_SND_WND: Final = 228  # __u32, Linux 6.2
TCPI_RCV_WND: Final = 232  # __u32, Linux 6.12
