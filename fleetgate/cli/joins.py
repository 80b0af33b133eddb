"""``fleetgate tokens add|ls|rm`` and ``fleetgate agents ls|rm``: join tokens and the
agents that joined with them (admins, on the bus; docs/agents-join.md)."""

from __future__ import annotations

import argparse
import getpass
import json
import socket
from collections.abc import Callable
from datetime import datetime
from typing import Any

from bus import Bus, joins
from bus.labels import is_valid_label_key
from bus.settings import NATS_HELP, resolve_nats
from fleetgate import aio
from fleetgate.cli.errors import UsageError
from fleetgate.cli.output import add_format, print_json
from fleetgate.cli.tables import print_table
from fleetgate.durations import format_duration, parse_duration

Common = Callable[[argparse.ArgumentParser], None]
MAX_TOKEN_TTL = 7 * 86400.0

LIST_JSON = "json: a list of objects, one per row (default text: a table)"


def _ttl(text: str) -> float:
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not 0 < seconds <= MAX_TOKEN_TTL:
        raise argparse.ArgumentTypeError(
            f"must be longer than zero and at most {format_duration(MAX_TOKEN_TTL)}"
        )
    return seconds


def _labels(text: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep or not is_valid_label_key(key.strip()):
            raise argparse.ArgumentTypeError(f"{part!r}: expected key=value, e.g. env=prod")
        labels[key.strip()] = value.strip()
    return labels


def _allow(text: str) -> joins.AwsAllow:
    try:
        return joins.parse_allow(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(sub: Any, common: Common) -> None:
    tokens = sub.add_parser("tokens", help="one-time join tokens for agents (admins)")
    actions = tokens.add_subparsers(dest="action", metavar="ACTION", required=True)
    add = actions.add_parser("add", help="make a join token and print it (once)")
    add.add_argument("--type", required=True, choices=["agent"], help="what joins with it")
    add.add_argument(
        "--method",
        default="token",
        choices=["token", "aws"],
        help="token: a one-time token (default); aws: an allow rule for AWS identities",
    )
    add.add_argument(
        "--allow",
        type=_allow,
        metavar="account=ACCOUNT,arn=ARN",
        help="with --method aws: the AWS identities admitted (ARN glob, * and ?)",
    )
    add.add_argument(
        "--ttl",
        type=_ttl,
        default=None,
        help="how long it may be used (1h; an AWS rule: until removed)",
    )
    add.add_argument("--labels", type=_labels, default={}, help="k=v,... given to the agent")
    add_format(
        add,
        "one object as tokens ls --format json shows the token (id, type, method, allow, "
        "expires, labels, creator, state, ...) plus token: the join token itself (shown "
        "only now; null for --method aws, whose id is all an agent needs)",
        text="the token (or rule id) on the first line, then what it admits",
    )
    ls = actions.add_parser("ls", help="list join tokens (never their secrets)")
    ls.add_argument("--format", default="text", choices=["text", "json"], help=LIST_JSON)
    rm = actions.add_parser(
        "rm", help="remove a token (agents that joined with it can no longer renew)"
    )
    rm.add_argument("id")
    add_format(
        rm,
        "one object with id, method, removed (true) and spent_by (the agent that joined "
        "with it, which can no longer renew; null if none)",
    )
    for parser, handler in ((add, _tokens_add), (ls, _tokens_ls), (rm, _tokens_rm)):
        parser.add_argument("--nats", help=NATS_HELP)
        common(parser)
        parser.set_defaults(handler=handler)
    agents = sub.add_parser("agents", help="agents that joined the fleet (admins)")
    actions = agents.add_subparsers(dest="action", metavar="ACTION", required=True)
    ls = actions.add_parser("ls", help="list joined agents")
    ls.add_argument("--format", default="text", choices=["text", "json"], help=LIST_JSON)
    rm = actions.add_parser("rm", help="revoke an agent: it can no longer renew")
    rm.add_argument("host_id")
    add_format(rm, "one object with host_id and removed (true)")
    for parser, handler in ((ls, _agents_ls), (rm, _agents_rm)):
        parser.add_argument("--nats", help=NATS_HELP)
        common(parser)
        parser.set_defaults(handler=handler)


async def _connect(args: argparse.Namespace) -> Bus:
    return await Bus.connect(resolve_nats(args.nats), name="fleetgate-admin")


def _when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%SZ") if moment is not None else "-"


def _creator() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "?"
    return f"{user}@{socket.gethostname()}"


def _tokens_add(args: argparse.Namespace) -> int:
    async def go() -> int:
        if args.method == "aws":
            return await add_rule()
        if args.allow is not None:
            raise UsageError("--allow is for --method aws (a token admits whoever holds it)")
        text, record = joins.new_token(
            ttl=args.ttl or 3600.0, labels=args.labels, creator=_creator()
        )
        async with await _connect(args) as bus:
            await joins.add_token(bus, record)
        if args.format == "json":
            print_json(_token_doc(record, text))
            return 0
        print(text)
        print(
            f"join token {record.id} for an agent, valid until {_when(record.expires)} and "
            "for one join; it is shown only now. Put it in the agent's join.token_file.",
            flush=True,
        )
        return 0

    async def add_rule() -> int:
        if args.allow is None:
            raise UsageError(
                "--method aws needs --allow 'account=ACCOUNT,arn=ARN': the AWS identities it admits"
            )
        record = joins.new_aws_rule(
            allow=args.allow, ttl=args.ttl, labels=args.labels, creator=_creator()
        )
        async with await _connect(args) as bus:
            await joins.add_token(bus, record)
        if args.format == "json":
            print_json(_token_doc(record, None))
            return 0
        print(record.id)
        until = f"until {_when(record.expires)}" if record.expires else "until removed"
        print(
            f"AWS join rule {record.id}: agents with join.method aws whose identity matches "
            f"{args.allow.text()} join, {until}; fleetgate tokens rm {record.id} revokes them.",
            flush=True,
        )
        return 0

    return aio.run(go())


def _token_doc(record: joins.JoinToken, token: str | None) -> dict[str, Any]:
    """A token as ``tokens ls --format json`` lists it, with the secret text when given."""
    doc: dict[str, Any] = record.model_dump(mode="json", exclude={"hash"})
    return {**doc, "state": record.state(), "token": token}


def _tokens_ls(args: argparse.Namespace) -> int:
    async def go() -> int:
        async with await _connect(args) as bus:
            tokens = await joins.list_tokens(bus)
        if args.format == "json":
            rows = [
                {**t.model_dump(mode="json", exclude={"hash"}), "state": t.state()} for t in tokens
            ]
            print(json.dumps(rows, indent=2))
            return 0
        table = [("ID", "TYPE", "METHOD", "STATE", "EXPIRES", "LABELS", "CREATOR", "SPENT BY")]
        for t in tokens:
            labels = ",".join(f"{k}={v}" for k, v in sorted(t.labels.items()))
            table.append(
                (
                    t.id,
                    t.type,
                    t.method + (f" {t.allow.text()}" if t.allow else ""),
                    t.state(),
                    _when(t.expires) if t.expires else "never",
                    labels or "-",
                    t.creator,
                    t.spent_by or "-",
                )
            )
        print_table(table)
        return 0

    return aio.run(go())


def _tokens_rm(args: argparse.Namespace) -> int:
    async def go() -> int:
        async with await _connect(args) as bus:
            found = await joins.get_token(bus, args.id)
            if found is None:
                raise UsageError(f"no join token {args.id!r} (see fleetgate tokens ls)")
            await joins.delete_token(bus, args.id)
        if args.format == "json":
            print_json(
                {
                    "id": args.id,
                    "method": found.record.method,
                    "removed": True,
                    "spent_by": found.record.spent_by or None,
                }
            )
            return 0
        if found.record.method == "aws":
            print(
                f"removed AWS join rule {args.id}; agents that joined by it can no longer "
                "renew their certificates"
            )
        elif found.record.spent is not None:
            print(
                f"removed join token {args.id}; agent {found.record.spent_by}, which joined "
                "with it, can no longer renew its certificate"
            )
        else:
            print(f"removed join token {args.id}; it can no longer be used")
        return 0

    return aio.run(go())


def _agents_ls(args: argparse.Namespace) -> int:
    async def go() -> int:
        async with await _connect(args) as bus:
            agents = await joins.list_agents(bus)
        if args.format == "json":
            rows = [{**a.model_dump(mode="json"), "state": joins.agent_state(a)} for a in agents]
            print(json.dumps(rows, indent=2))
            return 0
        table = [("HOST ID", "HOSTNAME", "ADDR", "LABELS", "CERT EXPIRES", "JOINED", "RENEWED")]
        for a in agents:
            labels = ",".join(f"{k}={v}" for k, v in sorted(a.labels.items()))
            expires = _when(a.expires) + (" (expired)" if joins.agent_state(a) == "expired" else "")
            table.append(
                (a.host_id, a.hostname, a.addr, labels or "-", expires, _when(a.joined_at),
                 _when(a.renewed_at))
            )  # fmt: skip
        print_table(table)
        return 0

    return aio.run(go())


def _agents_rm(args: argparse.Namespace) -> int:
    async def go() -> int:
        async with await _connect(args) as bus:
            if not await joins.delete_agent(bus, args.host_id):
                raise UsageError(f"no joined agent {args.host_id!r} (see fleetgate agents ls)")
        if args.format == "json":
            print_json({"host_id": args.host_id, "removed": True})
            return 0
        print(
            f"removed agent {args.host_id}: it can no longer renew; its certificate (and the "
            "sessions through it) last until it expires"
        )
        return 0

    return aio.run(go())
