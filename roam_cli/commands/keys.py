"""``roam keys split|combine|refresh``: threshold protection of the deployment secret."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from migrate import shamir
from migrate.errors import ConfigError
from migrate.kernel.deployment import DeploymentDir, random_bytes, read_file, write_new
from migrate.registration import DeploymentSecret
from roam_cli.args import positive_int

if TYPE_CHECKING:
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]


def register(subparsers: Subparsers) -> None:
    keys = subparsers.add_parser(
        "keys",
        help="split, combine and refresh threshold shares of the deployment secret",
        description="Shamir sharing of the deployment secret (K_n and the group key) over "
        "GF(2^8): any K of N shares recover it, fewer reveal nothing.",
    )
    commands = keys.add_subparsers(dest="keys_command", metavar="COMMAND")
    commands.required = True

    split = commands.add_parser("split", help="split DIR's secret into N shares, K needed")
    split.add_argument("directory", metavar="DIR", type=Path)
    split.add_argument(
        "--threshold",
        required=True,
        type=positive_int,
        metavar="K",
        help="shares needed to recover the secret (at least 2: with 1, each share is the secret)",
    )
    split.add_argument("--shares", required=True, type=positive_int, metavar="N")
    split.add_argument(
        "--out",
        required=True,
        type=Path,
        metavar="DIR2",
        help="new directory for share-1.json .. share-N.json (0600)",
    )
    split.set_defaults(handler=run_split)

    combine = commands.add_parser(
        "combine",
        help="check that shares recover the secret; with --into, restore it",
        description="Recover the deployment secret from at least K shares of one generation. "
        "Without --into only checks; with --into DIR writes DIR/secret.json (never overwrites).",
    )
    combine.add_argument("shares", nargs="+", type=Path, metavar="SHARE")
    combine.add_argument(
        "--into", type=Path, metavar="DIR", help="deployment directory that lacks its secret.json"
    )
    combine.set_defaults(handler=run_combine)

    refresh = commands.add_parser(
        "refresh",
        help="new shares of the same secret; old ones stop mixing with them",
        description="Move the given shares onto a new random polynomial with the same secret, "
        "without reconstructing it. Refresh every holder's share at once: shares left out "
        "can no longer be combined with the new generation. At least K shares are needed.",
    )
    refresh.add_argument("shares", nargs="+", type=Path, metavar="SHARE")
    refresh.add_argument("--out", required=True, type=Path, metavar="DIR")
    refresh.set_defaults(handler=run_refresh)


def _new_directory(path: Path) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ConfigError(f"{path} already exists and is not empty; refusing to overwrite")
    path.mkdir(mode=0o700, parents=True, exist_ok=True)


def _write_shares(directory: Path, shares: list[shamir.Share]) -> None:
    _new_directory(directory)
    for share in shares:
        write_new(directory / f"share-{share.index}.json", share.encode())


def _load_shares(paths: list[Path]) -> list[shamir.Share]:
    shares = []
    for path in paths:
        try:
            shares.append(shamir.Share.decode(read_file(path, "share")))
        except ConfigError as error:
            raise ConfigError(f"{path}: {error}") from None
    return shares


def run_split(args: argparse.Namespace) -> int:
    directory = DeploymentDir(args.directory)
    secret = directory.secret()
    shares = shamir.split(
        secret.to_bytes(), secret.deployment_id, args.threshold, args.shares, random_bytes
    )
    _write_shares(args.out, shares)
    print(
        f"wrote {args.shares} shares to {args.out}; any {args.threshold} recover the secret. "
        f"Hand them to their holders, then remove {directory.path / 'secret.json'} from hosts "
        "that do not run a server."
    )
    return 0


def run_combine(args: argparse.Namespace) -> int:
    shares = _load_shares(args.shares)
    recovered = shamir.combine(shares)
    secret = DeploymentSecret.from_bytes(shares[0].deployment_id, recovered)
    if args.into is None:
        print(
            f"the {len(shares)} shares recover the secret of deployment "
            f"{secret.deployment_id.hex()}"
        )
        return 0
    DeploymentDir(args.into).restore_secret(secret)
    print(f"restored {args.into / 'secret.json'}")
    return 0


def run_refresh(args: argparse.Namespace) -> int:
    shares = _load_shares(args.shares)
    refreshed = shamir.refresh(shares, random_bytes)
    _write_shares(args.out, refreshed)
    print(f"wrote {len(refreshed)} refreshed shares to {args.out}; destroy the old ones")
    return 0
