"""atheris harness of the memcached target in fuzz/targets.py (arguments: fuzz/harness.py)."""

from harness import main

if __name__ == "__main__":
    main("memcached")
