"""``roam demo`` asks its schedule for roams while the download runs: never more than any
schedule of one- and two-tick epochs can offer in that time (else no draw would do)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from roam_cli.commands.demo import demo_roams


def test_a_download_of_four_ticks_asks_for_two_roams_and_a_short_one_for_none() -> None:
    assert demo_roams(12.6, 1.0) == 2
    assert demo_roams(4.0, 1.0) == 2
    assert demo_roams(3.9, 1.0) == 1
    assert demo_roams(1.9, 1.0) == 0


@given(
    st.floats(min_value=0.01, max_value=600),
    st.floats(min_value=0.05, max_value=10),
    st.lists(st.sampled_from([1, 2]), min_size=1, max_size=200),
)
def test_every_schedule_of_one_and_two_tick_epochs_has_that_many_epoch_changes(
    transfer_s: float, tick: float, lengths: list[int]
) -> None:
    boundaries, at = 0, 0.0
    for length in lengths:
        at += length * tick
        if at <= transfer_s:
            boundaries += 1
    if sum(lengths) * tick >= transfer_s:  # the epochs cover the download
        assert boundaries >= demo_roams(transfer_s, tick)
