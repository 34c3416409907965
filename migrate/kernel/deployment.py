"""Deployment directories, bundles and shares on disk: the one file adapter for them.

The CLI (``roam init``, ``roam add-client``...) writes these files; the server shim and the labs
read them. It lives here, below the CLI, so that no daemon or lab imports ``roam_cli``.

A deployment directory holds three files::

    deployment.json   public parameters (0644)
    secret.json       K_n and the group key (0600)
    clients.sealed    the legitimate-client list, sealed with the group key (0600)
    chain-index.sealed  every 2^16-th key below K_n, sealed with the group key (0600,
                      optional: ``roam init`` / ``roam index``; lets a server start fast)

The directory itself is 0700. Files are written atomically (temporary file, fsync, rename) so a
crash never leaves half a file, and secrets are created with their final mode, never chmod-ed
after the fact. Commands that change the client list hold an exclusive lock on the directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from migrate.chainindex import open_index, seal_index
from migrate.errors import AuthenticationError, ConfigError
from migrate.hashchain import PebbleIndex
from migrate.kernel.files import write_private
from migrate.registration import Bundle, ClientList, Deployment, DeploymentSecret

DEPLOYMENT_FILE = "deployment.json"
SECRET_FILE = "secret.json"
CLIENTS_FILE = "clients.sealed"
LOCK_FILE = ".lock"
CHAIN_INDEX_FILE = "chain-index.sealed"


def random_bytes(count: int) -> bytes:
    """Randomness for sealing, from the operating system (the core takes it as a callable)."""
    return secrets.token_bytes(count)


def write_new(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Create ``path`` with ``data``; refuse to overwrite anything."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise ConfigError(f"{path} already exists; refusing to overwrite it") from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def read_file(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {path} is a directory") from None


@dataclass(frozen=True)
class DeploymentDir:
    path: Path

    @property
    def deployment_file(self) -> Path:
        return self.path / DEPLOYMENT_FILE

    def exists(self) -> bool:
        return self.deployment_file.is_file()

    def check(self) -> None:
        if not self.path.is_dir():
            raise ConfigError(f"deployment directory {self.path} does not exist")
        if not self.exists():
            raise ConfigError(f"{self.path} is not a deployment directory (no {DEPLOYMENT_FILE})")

    def deployment(self) -> Deployment:
        self.check()
        try:
            return Deployment.decode(read_file(self.deployment_file, "deployment file"))
        except ConfigError as error:
            raise ConfigError(f"{self.deployment_file}: {error}") from None

    def secret(self) -> DeploymentSecret:
        self.check()
        path = self.path / SECRET_FILE
        secret = DeploymentSecret.decode(read_file(path, "deployment secret"))
        if secret.deployment_id != self.deployment().deployment_id:
            raise ConfigError(f"{path} belongs to another deployment")
        return secret

    def secret_with_index(self) -> DeploymentSecret:
        """The secret with the chain's pebble index attached, if the directory has one."""
        secret = self.secret()
        index = self.chain_index(secret)
        return secret if index is None else replace(secret, chain_index=index)

    def chain_index(self, secret: DeploymentSecret) -> PebbleIndex | None:
        path = self.path / CHAIN_INDEX_FILE
        if not path.exists():
            return None
        deployment = self.deployment()
        try:
            return open_index(
                read_file(path, "chain index"),
                secret.group_key,
                secret.deployment_id,
                secret.chain_key,
                deployment.chain_length,
            )
        except (ConfigError, AuthenticationError) as error:
            raise ConfigError(f"{path}: {error}") from None

    def save_chain_index(self, index: PebbleIndex, secret: DeploymentSecret) -> None:
        sealed = seal_index(
            index, secret.group_key, secret.deployment_id, secret.chain_key, random_bytes
        )
        write_private(self.path / CHAIN_INDEX_FILE, sealed)

    def has_secret(self) -> bool:
        return (self.path / SECRET_FILE).is_file()

    def clients(self, secret: DeploymentSecret | None = None) -> ClientList:
        secret = secret or self.secret()
        path = self.path / CLIENTS_FILE
        if not path.exists():
            return ClientList()
        return ClientList.open(read_file(path, "client list"), secret)

    def save_clients(self, clients: ClientList, secret: DeploymentSecret) -> None:
        write_private(self.path / CLIENTS_FILE, clients.seal(secret, random_bytes))

    def save_deployment(self, deployment: Deployment) -> None:
        write_private(self.deployment_file, deployment.encode(), 0o644)

    def create(self, deployment: Deployment, secret: DeploymentSecret) -> None:
        """Make a new deployment directory; refuses one that exists and is not empty."""
        if self.path.exists() and (not self.path.is_dir() or any(self.path.iterdir())):
            raise ConfigError(f"{self.path} already exists and is not empty; refusing to overwrite")
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.path, 0o700)
        write_new(self.path / SECRET_FILE, secret.encode())
        write_new(self.path / CLIENTS_FILE, ClientList().seal(secret, random_bytes))
        # Written last: a directory without deployment.json is not mistaken for a whole one.
        write_new(self.deployment_file, deployment.encode(), 0o644)

    def restore_secret(self, secret: DeploymentSecret) -> None:
        if self.has_secret():
            raise ConfigError(f"{self.path / SECRET_FILE} already exists; refusing to overwrite")
        if secret.deployment_id != self.deployment().deployment_id:
            raise ConfigError("the shares belong to another deployment")
        write_new(self.path / SECRET_FILE, secret.encode())

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        self.check()
        fd = os.open(self.path / LOCK_FILE, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def load_bundle(path: Path) -> Bundle:
    try:
        return Bundle.decode(read_file(path, "bundle"))
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
