"""Inputs the fuzzers found that once escaped as untyped errors; each is now a typed refusal."""

import os

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from migrate.channel import Purpose, derive_key
from migrate.errors import ConfigError, MalformedMessageError
from migrate.registration import Bundle, Deployment, DeploymentSecret, open_servers
from migrate.shamir import Share

READERS = [Deployment.decode, DeploymentSecret.decode, Bundle.decode, Share.decode]


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"[" * 100_000, id="nested-too-deep"),
        pytest.param(b"{" + b'"a":{' * 50_000, id="objects-nested-too-deep"),
        pytest.param(b"9" * 5000, id="integer-of-5000-digits"),
        pytest.param(b'{"format": "x", "version": ' + b"1" * 4400 + b"}", id="long-version"),
    ],
)
def test_json_files_that_python_cannot_read_are_config_errors(reader, data):
    with pytest.raises(ConfigError, match="not valid JSON"):
        reader(data)


def test_an_authentic_server_list_that_is_not_utf8_is_malformed():
    channel_key, deployment_id = os.urandom(32), bytes(16)
    key = derive_key(channel_key, Purpose.SERVER_LIST, deployment_id)
    nonce = bytes(12)
    sealed = nonce + ChaCha20Poly1305(key).encrypt(nonce, b"10.0.0.1:\xf9", deployment_id + b"al")
    with pytest.raises(MalformedMessageError, match="not UTF-8"):
        open_servers(sealed, channel_key, deployment_id, "al")
