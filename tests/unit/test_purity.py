"""The protocol core is pure: no I/O modules, no clock, no kernel adapters."""

import ast
import pathlib
import subprocess
import sys

import migrate

CORE = pathlib.Path(migrate.__file__).parent
FORBIDDEN_RUNTIME = {
    "socket",
    "asyncio",
    "subprocess",
    "netfilterqueue",
    "scapy",
    "pyroute2",
    "uvloop",
    "selectors",
}
FORBIDDEN_IMPORTS = FORBIDDEN_RUNTIME | {
    "time",
    "datetime",
    "random",
    "os",
    "threading",
    "migrate.kernel",
    "secrets",
}


def pure_modules():
    yield from sorted(CORE.glob("*.py"))


def test_importing_the_core_pulls_in_no_io_module():
    names = [f"migrate.{p.stem}" for p in pure_modules() if p.stem != "__init__"]
    code = (
        "import sys\n"
        + "".join(f"import {name}\n" for name in names)
        + "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    loaded = set(result.stdout.split())
    assert not loaded & FORBIDDEN_RUNTIME, loaded & FORBIDDEN_RUNTIME


def test_core_sources_import_nothing_forbidden():
    offenders = []
    for path in pure_modules():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                if any(name == f or name.startswith(f + ".") for f in FORBIDDEN_IMPORTS):
                    offenders.append(f"{path.name}: {name}")
    assert offenders == []


# The daemons and the labs sit below the CLI: they may use the core and the kernel adapters
# (deployment files included: migrate.kernel.deployment), never the ``roam`` command itself.
BELOW_THE_CLI = ("migrate", "proxy", "client_shim", "labs")


def imported_names(tree: ast.AST) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def test_nothing_below_the_cli_imports_roam_cli():
    root = CORE.parent
    offenders = []
    for package in BELOW_THE_CLI:
        for path in sorted((root / package).rglob("*.py")):
            for name in imported_names(ast.parse(path.read_text())):
                if name == "roam_cli" or name.startswith("roam_cli."):
                    offenders.append(f"{path.relative_to(root)}: {name}")
    assert offenders == []


# The hand-over's decisions live in migrate.handover; the executors only feed and execute its
# machines (issue 13). Their size is the symptom a decision creeping back in shows first.
EXECUTOR_BOUNDS = {"proxy/live.py": 500, "client_shim/migrator.py": 450}


def test_the_hand_over_executors_stay_thin():
    root = CORE.parent
    sizes = {name: len((root / name).read_text().splitlines()) for name in EXECUTOR_BOUNDS}
    assert {n: s for n, s in sizes.items() if s > EXECUTOR_BOUNDS[n]} == {}
