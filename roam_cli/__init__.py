"""The ``roam`` command line: thin glue between files, the kernel and the ``migrate`` core."""
