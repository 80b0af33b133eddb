"""The ``fleetgate`` command. Each service registers its subcommands here.

User mistakes (a bad config, an unreachable NATS) print one clear ``fleetgate: error:``
message and exit non-zero; a traceback means a bug. Output into a pipe whose reader has
gone (``fleetgate db ls | head``) ends quietly with exit code 141 (128 + SIGPIPE), what a
shell reports for other Unix tools there.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

# Only the standard library here: Ctrl-C while the rest loads (a third of a second)
# must end quietly like Ctrl-C later, so everything else is imported inside main().

Handler = Callable[[argparse.Namespace], int]
BROKEN_PIPE = 141
"""Exit code when standard output's reader went away: 128 + SIGPIPE, as for a tool the
signal ended."""


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    parser.add_argument("--log-format", default="text", choices=["text", "json"])


def build_parser() -> argparse.ArgumentParser:
    from fleetgate.cli import agent as agent_cli
    from fleetgate.cli import audit as audit_cli
    from fleetgate.cli import auth as auth_cli
    from fleetgate.cli import completion as completion_cli
    from fleetgate.cli import configure as configure_cli
    from fleetgate.cli import db as db_cli
    from fleetgate.cli import discovery as discovery_cli
    from fleetgate.cli import jetstream as jetstream_cli
    from fleetgate.cli import joins as joins_cli
    from fleetgate.cli import managed as managed_cli
    from fleetgate.cli import sandbox as sandbox_cli

    parser = argparse.ArgumentParser(
        prog="fleetgate",
        description="Safe, audited access to fleets of MemoryDB and Valkey/Redis databases.",
    )
    from client import doctor as doctor_cli
    from fleetgate import __version__

    parser.add_argument("--version", action="version", version=f"fleetgate {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    discovery_cli.register(sub, _common)
    db_cli.register(sub, _common)
    auth_cli.register(sub, _common)
    audit_cli.register(sub, _common)
    agent_cli.register(sub, _common)
    configure_cli.register(sub, _common)
    sandbox_cli.register(sub, _common)
    managed_cli.register(sub, _common)
    jetstream_cli.register(sub, _common)
    joins_cli.register(sub, _common)
    doctor_cli.register(sub, _common)
    completion_cli.register(sub, _common, parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        code = _run(argv)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        _quiet_stdout()
        return BROKEN_PIPE


def _quiet_stdout() -> None:
    """The reader of standard output is gone: point it at /dev/null so the interpreter's
    final flush does not fail again (the recipe of the Python docs' note on SIGPIPE)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (tests capture it)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def _run(argv: Sequence[str] | None) -> int:
    from bus.errors import BusError
    from fleetgate.cli.errors import UsageError
    from fleetgate.config import ConfigError
    from fleetgate.logs import setup_logging

    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    handler: Handler = args.handler
    try:
        return handler(args)
    except (ConfigError, UsageError, BusError) as exc:
        print(f"fleetgate: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError | UsageError) else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
