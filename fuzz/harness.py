"""Run one target of ``fuzz/targets.py`` under atheris (libFuzzer), seeded with valid inputs.

Each ``fuzz/fuzz_NAME.py`` calls ``main("NAME")``. Arguments are libFuzzer's, e.g.
``python3 fuzz/fuzz_updates.py -runs=100000`` or ``-max_total_time=60``; a directory given as
an argument is used (and grown) as the corpus, else a temporary one holds the seeds. A crash is
an input on which the target raised: an untyped error, or a rejected message that changed state
(libFuzzer writes it to ``crash-*``; replay it with ``python3 fuzz/fuzz_NAME.py crash-...``).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main(name: str) -> None:
    try:
        import atheris
    except ImportError:
        sys.exit("atheris is not installed: pip install atheris (it is in the project's dev extra)")
    with atheris.instrument_imports(include=["migrate", "fuzz"]):
        from fuzz import targets
    target = targets.TARGETS[name]
    args = list(sys.argv)
    corpus_given = any(Path(arg).is_dir() for arg in args[1:] if not arg.startswith("-"))
    replaying = any(Path(arg).is_file() for arg in args[1:] if not arg.startswith("-"))
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{name}-") as seed_dir:
        if not corpus_given and not replaying:
            for number, seed in enumerate(targets.seeds(name)):
                Path(seed_dir, f"seed-{number}").write_bytes(seed)
            args.append(seed_dir)
        atheris.Setup(args, target)
        atheris.Fuzz()
