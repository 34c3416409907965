"""One module per ``roam`` subcommand group; each exposes ``register(subparsers)``.

``register`` adds its parsers and sets ``handler`` (a callable taking the parsed arguments and
returning an exit status) with ``parser.set_defaults(handler=...)``.
"""
