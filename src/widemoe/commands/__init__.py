"""One module per `widemoe` subcommand; each defines `add_parser(subparsers)` and `run(args) -> int`."""
