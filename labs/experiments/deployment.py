"""A roaming deployment on the paper's topology, with the paper's fixed, alternating epochs.

``Fig2Topo`` is ``PaperTopo`` with the few attributes ``RoamingLab`` expects of a topology
(its servers, its clients, a subnet to take the VIP from). ``FixedEpochRoaming`` is a
``RoamingLab`` whose ``create()`` writes the deployment directory itself, with the library
calls ``roam init`` makes, but with a chain key that has a stretch of fixed, alternating epochs
(``labs.experiments.epochs``) and a start that puts that stretch at the experiment's start.
``redeploy()`` replaces the deployment and the shims between runs in the same lab.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from ipaddress import IPv4Network
from typing import Any

from labs.errors import LabError
from labs.experiments.epochs import FixedStretch, find_fixed_stretch
from labs.roaming import LISTEN_PORT, RoamingLab
from labs.topologies import PaperTopo
from migrate.endpoints import parse_address_and_port, parse_server_list
from migrate.kernel.deployment import DeploymentDir, random_bytes
from migrate.registration import DEPLOYMENT_ID_BYTES, Deployment, DeploymentSecret
from migrate.schedule import MSchedule

STRETCH_DRAWS = 200  # keys drawn before giving up (about 8 are needed on average)
CHAIN_LENGTH = 4000


class Fig2Topo(PaperTopo):
    """``PaperTopo`` as ``RoamingLab`` sees a topology: servers s1, s2; client c (the attacker
    ``a`` is not subscribed); the VIP comes from s1's segment (the client shim rewrites it to
    the active server before a packet leaves c, so it is never on a wire)."""

    @property
    def servers(self) -> list[str]:
        return list(self.SERVERS)

    @property
    def clients(self) -> list[str]:
        return [self.CLIENT]

    def subnet(self) -> IPv4Network:
        return self.addresses_of(self.SERVERS[0])[0].network


@dataclass
class FixedEpochRoaming(RoamingLab):
    """A deployment whose epochs ``stretch_epochs`` long from ``experiment_start`` last one
    tick each and alternate between the servers, s1 first."""

    stretch_epochs: int = 7
    experiment_start: float = 0.0  # set by create(): the start of the stretch (Unix time)
    fixed: bool = True  # False: the protocol's own random epochs (m=1: one or two ticks)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.m = 1
        self.chain_length = CHAIN_LENGTH
        self.stretch: FixedStretch | None = None

    def create(self) -> None:
        """Write a deployment whose fixed stretch starts ``start_delay`` from now; subscribe
        the client hosts. Not ``fixed``: ``roam init``'s random schedule, from now on."""
        if not self.fixed:
            for host in self.client_hosts:
                bundle = self.bundle_path(host)
                bundle.unlink(missing_ok=True)
                bundle.with_name(bundle.name + ".state").unlink(missing_ok=True)
            super().create()
            self.stretch = None
            self.experiment_start = self.start_time
            return
        servers = parse_server_list(self.server_list)
        stretch = None
        chain_key = b""
        for _draw in range(STRETCH_DRAWS):
            chain_key = random_bytes(32)
            stretch = find_fixed_stretch(
                chain_key,
                self.chain_length,
                m=self.m,
                server_count=len(servers),
                count=self.stretch_epochs,
            )
            if stretch is not None:
                break
        if stretch is None:
            raise LabError(f"no chain with {self.stretch_epochs} fixed epochs in {STRETCH_DRAWS}")
        self.stretch = stretch
        self.experiment_start = round(time.time() + self.start_delay, 3)
        self.start_time = self.experiment_start - stretch.units_before * self.tick
        if self.deployment_dir.exists():
            shutil.rmtree(self.deployment_dir)
        deployment = Deployment(
            deployment_id=random_bytes(DEPLOYMENT_ID_BYTES),
            servers=tuple(servers),
            vip=parse_address_and_port(f"{self.vip}:{LISTEN_PORT}", LISTEN_PORT).address,
            service_port=LISTEN_PORT,
            chain_length=self.chain_length,
            m=MSchedule(self.m),
            tick=self.tick,
            start=self.start_time,
            delta=self.delta,
            gamma=self.gamma,
        )
        secret = DeploymentSecret(deployment.deployment_id, chain_key, random_bytes(32))
        DeploymentDir(self.deployment_dir).create(deployment, secret)
        for host in self.client_hosts:
            bundle = self.bundle_path(host)
            bundle.unlink(missing_ok=True)
            bundle.with_name(bundle.name + ".state").unlink(missing_ok=True)
            self.subscribe(host, **self.subscribe_options)

    def experiment_epochs(self, count: int) -> list[dict[str, Any]]:
        """``roam schedule`` of ``count`` epochs from the experiment's first (start, length,
        server as JSON objects)."""
        return self.schedule(self.stretch.first_epoch if self.stretch else 1, count)

    def stop_shims(self) -> None:
        for shim in [*self.clients.values(), *self.servers.values()]:
            shim.stop()
        self.clients.clear()
        self.servers.clear()

    def redeploy(self, migration: str, *server_extra: str, shims: bool = True) -> None:
        """Stop any shims, write a new deployment, start the shims in ``migration`` mode
        (unless ``shims`` is false: a schedule only, e.g. for an attacker to follow) and
        return once they have started, before the experiment starts. A busy machine that
        starts them too late gets another deployment with twice the start delay."""
        start_delay = self.start_delay
        try:
            for _attempt in range(3):
                self.stop_shims()
                self.migration = migration
                self.create()
                if not shims:
                    return
                for host in self.server_hosts:
                    self.start_server(host, *server_extra)
                for host in self.client_hosts:
                    self.start_client(host)
                self.wait_ready()
                if time.time() < self.experiment_start - 0.2:
                    return
                self.start_delay *= 2
        finally:
            self.start_delay = start_delay
        raise LabError("the shims took too long to start, three times; the machine is too busy")
