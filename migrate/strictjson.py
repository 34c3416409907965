"""Strict reading of the project's JSON files (deployments, bundles, shares).

A file is a JSON object with a ``format`` name and a ``version``; every field is required unless
the reader says otherwise, has one type, and unknown fields are refused, so a typo in a
hand-edited file is an error rather than a silently ignored setting. A key given twice in one
object is refused too: Python's parser would keep the last one silently, so two readers (or a
human and the parser) could see different values in the same file.
"""

from __future__ import annotations

import binascii
import json
import math
from typing import Any

from migrate.errors import ConfigError


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document: dict[str, Any] = {}
    for key, value in pairs:
        if key in document:
            raise ValueError(f"key {key!r} given twice in one object")
        document[key] = value
    return document


def loads(text: str | bytes) -> Any:
    """``json.loads`` that refuses duplicate keys (raises ValueError naming the key)."""
    return json.loads(text, object_pairs_hook=_refuse_duplicate_keys)


def parse_object(data: bytes, expected_format: str, version: int) -> Fields:
    try:
        value = loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as error:
        # ValueError: bad UTF-8, bad JSON, a duplicate key, or an integer of more digits than
        # Python converts;
        # RecursionError: arrays or objects nested too deep.
        raise ConfigError(f"{expected_format}: not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{expected_format}: expected a JSON object")
    fields = Fields(value, expected_format)
    found_format = fields.string("format")
    if found_format != expected_format:
        raise ConfigError(f"expected a {expected_format} file, found {found_format!r}")
    found_version = fields.integer("version")
    if found_version != version:
        raise ConfigError(f"{expected_format}: unsupported version {found_version}")
    return fields


def dump_object(expected_format: str, version: int, fields: dict[str, Any]) -> bytes:
    document = {"format": expected_format, "version": version, **fields}
    return (json.dumps(document, indent=2, sort_keys=False) + "\n").encode()


class Fields:
    """Typed, tracked access to a JSON object's fields."""

    def __init__(self, value: dict[str, Any], what: str) -> None:
        self._value = value
        self._what = what
        self._seen: set[str] = set()

    def _get(self, name: str) -> Any:
        self._seen.add(name)
        if name not in self._value:
            raise ConfigError(f"{self._what}: missing field {name!r}")
        return self._value[name]

    def is_null(self, name: str) -> bool:
        """True if the (required) field is JSON null: an optional value left unset."""
        return self._get(name) is None

    def list_of_integers(self, name: str) -> list[int]:
        value = self._get(name)
        if not isinstance(value, list) or not all(
            isinstance(item, int) and not isinstance(item, bool) for item in value
        ):
            raise ConfigError(f"{self._what}: field {name!r} must be a list of integers")
        return value

    def has(self, name: str) -> bool:
        return name in self._value

    def string(self, name: str) -> str:
        value = self._get(name)
        if not isinstance(value, str):
            raise ConfigError(f"{self._what}: field {name!r} must be a string")
        return value

    def integer(self, name: str, minimum: int | None = None, maximum: int | None = None) -> int:
        value = self._get(name)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{self._what}: field {name!r} must be an integer")
        if minimum is not None and value < minimum:
            raise ConfigError(f"{self._what}: field {name!r} must be at least {minimum}")
        if maximum is not None and value > maximum:
            raise ConfigError(f"{self._what}: field {name!r} must be at most {maximum}")
        return value

    def number(self, name: str) -> float:
        value = self._get(name)
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ConfigError(f"{self._what}: field {name!r} must be a number")
        if not math.isfinite(value):
            raise ConfigError(f"{self._what}: field {name!r} must be finite")
        return float(value)

    def boolean(self, name: str) -> bool:
        value = self._get(name)
        if not isinstance(value, bool):
            raise ConfigError(f"{self._what}: field {name!r} must be true or false")
        return value

    def hex_bytes(self, name: str, size: int | None = None) -> bytes:
        text = self.string(name)
        try:
            value = binascii.unhexlify(text)
        except (binascii.Error, ValueError):
            raise ConfigError(f"{self._what}: field {name!r} is not hexadecimal") from None
        if size is not None and len(value) != size:
            raise ConfigError(f"{self._what}: field {name!r} must be {size} bytes")
        return value

    def list_of_strings(self, name: str) -> list[str]:
        value = self._get(name)
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise ConfigError(f"{self._what}: field {name!r} must be a list of strings")
        return value

    def list_of_objects(self, name: str) -> list[Fields]:
        value = self._get(name)
        if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
            raise ConfigError(f"{self._what}: field {name!r} must be a list of objects")
        return [Fields(item, f"{self._what} {name}[{i}]") for i, item in enumerate(value)]

    def object(self, name: str) -> Fields:
        value = self._get(name)
        if not isinstance(value, dict):
            raise ConfigError(f"{self._what}: field {name!r} must be an object")
        return Fields(value, f"{self._what} {name}")

    def names(self) -> list[str]:
        return list(self._value)

    def done(self) -> None:
        """Refuse fields nobody read."""
        unknown = sorted(set(self._value) - self._seen)
        if unknown:
            raise ConfigError(f"{self._what}: unknown field(s) {', '.join(map(repr, unknown))}")
