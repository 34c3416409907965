"""What the client shim keeps across restarts: key extensions, m changes, replay counters.

Without it a restarted client would fall back to its bundle's key (losing online extensions)
and forget which update counters it has seen (so an attacker could replay a recent update).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from migrate.errors import ConfigError
from migrate.hashchain import KEY_BYTES, hash_down
from migrate.registration import Bundle
from migrate.schedule import MSchedule
from migrate.strictjson import dump_object, parse_object

STATE_FORMAT = "server-roaming/client-state"


@dataclass(slots=True)
class ClientState:
    deployment_id: bytes
    client_id: int
    key_index: int
    chain_key: bytes
    m: MSchedule
    counters: dict[int, int] = field(default_factory=dict)  # sender -> highest accepted
    # Every counter this client's sealers use is above it (migrate.channel.CounterFloor).
    counter_floor: int = 0

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> ClientState:
        return cls(
            bundle.deployment_id, bundle.client_id, bundle.key_index, bundle.chain_key, bundle.m
        )

    def encode(self) -> bytes:
        return dump_object(
            STATE_FORMAT,
            1,
            {
                "deployment_id": self.deployment_id.hex(),
                "client_id": self.client_id,
                "key_index": self.key_index,
                "chain_key": self.chain_key.hex(),
                "m": {str(k): v for k, v in self.m.as_mapping().items()},
                "counters": {str(k): v for k, v in sorted(self.counters.items())},
                "counter_floor": self.counter_floor,
            },
        )

    @classmethod
    def decode(cls, data: bytes) -> ClientState:
        fields = parse_object(data, STATE_FORMAT, 1)
        raw_m = fields.object("m")
        mapping = {int(k): raw_m.integer(k) for k in raw_m.names() if k.isdigit()}
        if len(mapping) != len(raw_m.names()):
            raise ConfigError("client state: m keys must be epoch numbers")
        raw_m.done()
        raw_counters = fields.object("counters")
        counters = {int(k): raw_counters.integer(k, 1) for k in raw_counters.names() if k.isdigit()}
        if len(counters) != len(raw_counters.names()):
            raise ConfigError("client state: counter keys must be sender numbers")
        raw_counters.done()
        state = cls(
            fields.hex_bytes("deployment_id", 16),
            fields.integer("client_id", 1),
            fields.integer("key_index", 1),
            fields.hex_bytes("chain_key", KEY_BYTES),
            MSchedule.from_mapping(mapping),
            counters,
        )
        # Absent from state files written before counters were kept: nothing reserved then.
        if fields.has("counter_floor"):
            state.counter_floor = fields.integer("counter_floor", 0)
        fields.done()
        return state


def load_state(path: Path, bundle: Bundle) -> ClientState:
    """The saved state if it belongs to this bundle and is newer; otherwise the bundle's."""
    fresh = ClientState.from_bundle(bundle)
    if not path.exists():
        return fresh
    try:
        saved = ClientState.decode(path.read_bytes())
    except ConfigError as error:
        raise ConfigError(f"{path}: {error} (remove the file to start from the bundle)") from None
    if saved.deployment_id != bundle.deployment_id or saved.client_id != bundle.client_id:
        raise ConfigError(f"{path} belongs to another deployment or client")
    if saved.key_index < bundle.key_index:
        saved.key_index, saved.chain_key = bundle.key_index, bundle.chain_key
    elif hash_down(saved.chain_key, saved.key_index - bundle.key_index) != bundle.chain_key:
        raise ConfigError(f"{path}: its key does not hash down to the bundle's key; not using it")
    return saved
