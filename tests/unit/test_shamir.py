import itertools
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migrate.errors import ConfigError
from migrate.shamir import Share, check_value, combine, gf_div, gf_mul, refresh, split

DEPLOYMENT = bytes(16)


def test_field_arithmetic():
    for a in range(1, 256):
        assert gf_mul(a, gf_div(1, a)) == 1
    assert gf_mul(0x57, 0x83) == 0xC1  # FIPS-197 example


@settings(max_examples=30, deadline=None)
@given(secret=st.binary(min_size=1, max_size=64), k=st.integers(2, 5), extra=st.integers(0, 3))
def test_any_k_shares_recover_the_secret(secret, k, extra):
    n = k + extra
    shares = split(secret, DEPLOYMENT, k, n, os.urandom)
    for subset in itertools.combinations(shares, k):
        assert combine(list(subset)) == secret
    with pytest.raises(ConfigError, match=f"need {k} shares"):
        combine(shares[: k - 1])


def test_refresh_keeps_the_secret_and_old_shares_do_not_mix():
    secret = os.urandom(64)
    old = split(secret, DEPLOYMENT, 3, 5, os.urandom)
    new = refresh(old, os.urandom)
    assert combine(new[1:4]) == secret
    assert all(a.value != b.value for a, b in zip(old, new, strict=True))
    with pytest.raises(ConfigError, match="different generations"):
        combine([old[0], new[1], new[2]])
    # Even when the generation label is forged to match, a mixed set does not reconstruct.
    forged = Share(new[0].deployment_id, new[0].generation, 3, 5, 1, old[0].value, old[0].check)
    with pytest.raises(ConfigError, match="do not reconstruct"):
        combine([forged, new[1], new[2]])


def test_share_files_roundtrip_and_validation():
    shares = split(b"s" * 64, DEPLOYMENT, 2, 3, os.urandom)
    assert Share.decode(shares[0].encode()) == shares[0]
    with pytest.raises(ConfigError, match="given twice"):
        combine([shares[0], shares[0]])
    with pytest.raises(ConfigError, match="threshold"):
        split(b"s", DEPLOYMENT, 4, 3, os.urandom)
    corrupted = Share(DEPLOYMENT, shares[0].generation, 2, 3, 1, bytes(64), shares[0].check)
    with pytest.raises(ConfigError, match="do not reconstruct"):
        combine([corrupted, shares[1]])


def test_threshold_one_is_refused_because_every_share_would_be_the_secret():
    secret = os.urandom(64)
    with pytest.raises(ConfigError, match="threshold 1 protects nothing"):
        split(secret, DEPLOYMENT, 1, 3, os.urandom)
    # A threshold-1 share written before the check still recovers its secret (nothing lost),
    # but refreshing it is refused: it would still be the secret itself.
    old = Share(DEPLOYMENT, bytes(8), 1, 2, 1, secret, check_value(DEPLOYMENT, secret))
    assert combine([old]) == secret
    with pytest.raises(ConfigError, match="split the secret again"):
        refresh([old], os.urandom)


def test_refresh_with_fewer_than_threshold_shares_is_refused():
    secret = os.urandom(64)
    shares = split(secret, DEPLOYMENT, 3, 5, os.urandom)
    with pytest.raises(ConfigError, match="refresh needs at least 3 shares"):
        refresh(shares[:2], os.urandom)
    # Exactly k is enough, and the new generation recovers the secret.
    assert combine(refresh(shares[1:4], os.urandom)) == secret
