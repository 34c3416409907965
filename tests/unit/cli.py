"""Running the ``roam`` command in-process, for the unit tests of the CLI."""

from roam_cli.main import main


def run(capsys, *argv):
    """``roam ARGV...``: the exit status, stdout and stderr."""
    try:
        status = main(list(argv))
    except SystemExit as exit_:
        status = exit_.code
    out, err = capsys.readouterr()
    return status, out, err


def subscribe(capsys, deployment, name, address, out, *extra, until=10):
    """``roam subscribe`` of ``name`` at ``address`` until epoch ``until``, the bundle to
    ``out``."""
    return run(
        capsys,
        "subscribe",
        str(deployment),
        name,
        "--address",
        address,
        "--until-epoch",
        str(until),
        "--out",
        str(out),
        *extra,
    )
