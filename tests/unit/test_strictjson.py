"""The strict JSON reader of the project's files."""

import os

import pytest

from migrate.errors import ConfigError
from migrate.shamir import Share, split
from migrate.strictjson import dump_object, parse_object


def test_a_key_given_twice_is_refused_naming_the_key():
    # Python's parser keeps the last value silently: a hand-edited or forged file could show
    # one threshold to a reader and mean another.
    data = b'{"format": "f", "version": 1, "threshold": 5, "threshold": 1}'
    with pytest.raises(ConfigError, match="key 'threshold' given twice"):
        parse_object(data, "f", 1)


def test_a_key_given_twice_in_a_nested_object_is_refused():
    data = b'{"format": "f", "version": 1, "m": {"a": 1, "a": 2}}'
    with pytest.raises(ConfigError, match="key 'a' given twice"):
        parse_object(data, "f", 1)


def test_a_share_file_with_a_duplicate_field_is_refused():
    share = split(b"s" * 64, bytes(16), 2, 3, os.urandom)[0]
    text = share.encode().decode()
    forged = text.replace('"index": 1,', '"index": 1,\n  "index": 2,')
    assert forged != text
    with pytest.raises(ConfigError, match="key 'index' given twice"):
        Share.decode(forged.encode())


def test_distinct_keys_still_parse():
    fields = parse_object(dump_object("f", 1, {"a": 1, "b": {"a": 2}}), "f", 1)
    assert fields.integer("a") == 1
    assert fields.object("b").integer("a") == 2
