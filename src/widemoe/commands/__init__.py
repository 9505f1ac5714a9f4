"""One module per `widemoe` subcommand; each defines `add_parser(subparsers)` and `run(args) -> int`.

Commands are thin: parse, call the library, print. The library raises exceptions (`ValueError`
subclasses such as `ConfigError`, `SpecError`, `TokenizerError`); `widemoe.cli.main` turns them into
`error: ...` messages, so nothing below `commands/` raises `SystemExit`.
"""
