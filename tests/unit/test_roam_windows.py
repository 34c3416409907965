"""The receive windows a roam's GOs carry (docs/protocol.md 8.3): read in the freeze with the
COMMIT's positions; only those too small to be final are read again after the switch."""

from __future__ import annotations

from client_shim.roams import LOW_WINDOW_SEGMENTS, MIN_MSS, RoamRecord, low_window
from migrate.kernel.sockdiag import TcpSocketInfo
from migrate.kernel.tcp_repair import RESTORED_WINDOW_SEGMENTS


def info(port: int, rcv_wnd: int | None, mss: int = 1448) -> TcpSocketInfo:
    return TcpSocketInfo(
        src=("10.0.1.4", port), dst=("10.0.0.100", 80), state="ESTABLISHED", inode=1, uid=0,
        cookie=port, family=2, rqueue=0, wqueue=0, has_info=True, snd_mss=mss, rcv_mss=mss,
        rcv_wnd=rcv_wnd,
    )  # fmt: skip


def test_the_threshold_lies_above_the_new_servers_guess_for_any_mss() -> None:
    # The new server lowers its guess (RESTORED_WINDOW_SEGMENTS) only to a smaller window: any
    # window at or above the threshold leaves the guess as it is, whatever it opened to since.
    assert LOW_WINDOW_SEGMENTS > RESTORED_WINDOW_SEGMENTS
    for mss in (536, 1448, 8948):
        assert low_window(info(1, 0, mss)) >= RESTORED_WINDOW_SEGMENTS * max(mss, MIN_MSS)


def test_windows_noted_in_the_freeze_and_the_low_ones_marked() -> None:
    record = RoamRecord(7, "10.0.1.2:80", 0.0)
    threshold = low_window(info(0, 0))
    sockets = {
        40000: info(40000, 0),  # closed: the application was behind at the freeze
        40001: info(40001, threshold - 1),
        40002: info(40002, threshold),
        40003: info(40003, 6 << 20),
        40004: info(40004, None),  # a kernel before 6.12 does not say: GO without it
    }
    record.note_windows(sockets)
    assert record.windows == {p: i.rcv_wnd for p, i in sockets.items()}
    assert record.low_windows == {40000, 40001}
    # The late newcomers' freeze adds theirs; a window noted again replaces the first.
    record.note_windows({40005: info(40005, 100), 40003: info(40003, 10)})
    assert record.windows[40005] == 100
    assert record.windows[40003] == 10
    assert record.low_windows == {40000, 40001, 40003, 40005}


def test_a_larger_mss_raises_the_threshold() -> None:
    assert low_window(info(1, 0, 8948)) == LOW_WINDOW_SEGMENTS * 8948
    assert low_window(info(1, 0, 536)) == LOW_WINDOW_SEGMENTS * MIN_MSS
