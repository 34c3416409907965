from labs.faults import verdict


def test_verdicts_never_call_wrong_bytes_a_clean_failure():
    data = b"0123456789"
    assert verdict(data, data, True, []) == "intact"
    assert verdict(data[:4], data, False, ["handoff diverged"]) == "failed-clean"
    assert verdict(data[:4], data, False, []) == "failed-silent"
    assert verdict(b"0124", data, False, ["x"]) == "corrupted"
    assert verdict(b"0124", data, True, []) == "corrupted"
    # curl said it completed, but bytes are missing: not intact.
    assert verdict(data[:4], data, True, []) == "failed-silent"
