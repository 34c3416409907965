"""The shims started from TOML files only (``roam server --config FILE``, ``roam client --config
FILE``): the pool serves through the VIP; a broken file is refused with its key named, and
nothing of a shim is created."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from labs import Lab, PoolTopo
from labs.roaming import LISTEN_PORT, SERVICE_PORT, RoamingLab, ShimProcess, roam_argv

pytestmark = pytest.mark.system


def spawn(roaming: RoamingLab, host: str, kind: str, config: Path) -> ShimProcess:
    stem = roaming.workdir / f"{kind}-{host}"
    stderr_path = Path(f"{stem}.stderr")
    with stderr_path.open("wb") as stderr:
        process = roaming.lab[host].popen(
            roam_argv(kind, "--config", str(config)), stdout=subprocess.DEVNULL, stderr=stderr
        )
    return ShimProcess(
        host, kind, process, Path(f"{stem}.jsonl"), stderr_path, Path(f"{stem}.status.json")
    )


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def server_toml(roaming: RoamingLab, host: str) -> str:
    stem = roaming.workdir / f"server-{host}"
    return (
        f'deployment = "{roaming.deployment_dir}"\n'
        f'listen = "{roaming.listen_of(host)}"\n'
        f'service = "127.0.0.1:{SERVICE_PORT}"\n'
        f'log-json = "{stem}.jsonl"\n'
        f'status = "{stem}.status.json"\n'
        "update-period = 1\n"
        "quiet = true\n"
    )


def wait_started(shim: ShimProcess, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not any(e["event"] == "start" for e in shim.events()):
        assert shim.running(), f"{shim.kind} on {shim.host} exited: {shim.stderr_tail()}"
        assert time.monotonic() < deadline, f"{shim.kind} on {shim.host} did not start"
        time.sleep(0.05)


def test_the_shims_run_from_toml_files_and_a_broken_file_creates_nothing() -> None:
    with Lab(PoolTopo(servers=3, clients=1)) as lab:
        roaming = RoamingLab(lab, tick=1.0, m=1, migration="live")
        shims: list[ShimProcess] = []
        try:
            for host in roaming.server_hosts:
                roaming.start_service(host)
            roaming.create()
            # A broken file: one line naming the key; no table, no log, no state.
            broken = write(
                roaming.workdir / "broken.toml",
                server_toml(roaming, "s1") + 'migration = "teleport"\n',
            )
            refused = lab["s1"].run(roam_argv("server", "--config", str(broken)), timeout=60)
            assert refused.returncode == 1
            assert refused.stderr.count("\n") == 1
            assert "key 'migration': 'teleport' is not one of live, reconnect" in refused.stderr
            assert not (roaming.workdir / "server-s1.jsonl").exists()
            assert not (roaming.deployment_dir / "state").exists()
            tables = lab["s1"].run(["nft", "list", "tables"], check=True).stdout
            assert "roam_srv" not in tables
            for host in roaming.server_hosts:
                config = write(roaming.workdir / f"{host}.toml", server_toml(roaming, host))
                shims.append(spawn(roaming, host, "server", config))
            client_config = write(
                roaming.workdir / "c1.toml",
                f'bundle = "{roaming.bundle_path("c1")}"\n'
                f'log-json = "{roaming.workdir / "client-c1.jsonl"}"\n'
                f'status = "{roaming.workdir / "client-c1.status.json"}"\n'
                "quiet = true\n",
            )
            shims.append(spawn(roaming, "c1", "client", client_config))
            for shim in shims:
                wait_started(shim)
            roaming.wait_for_schedule()
            url = f"http://{roaming.vip}:{LISTEN_PORT}/whoami"
            deadline = time.monotonic() + 20
            while True:
                answer = lab["c1"].run(["curl", "-s", "--max-time", "2", url])
                if answer.returncode == 0 and answer.stdout in roaming.server_hosts:
                    break
                assert time.monotonic() < deadline, f"no answer through the VIP: {answer}"
                time.sleep(0.2)
            started = next(e for e in shims[0].events() if e["event"] == "start")
            assert started["migration"] == "live"
        finally:
            for shim in reversed(shims):
                shim.stop(signal.SIGTERM)
            for service in roaming.services.values():
                service.stop()
        assert all(shim.process.returncode == 0 for shim in shims)
        assert "roam_" not in lab["s1"].run(["nft", "list", "tables"], check=True).stdout
