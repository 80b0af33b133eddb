"""``fleetgate audit tail`` and ``fleetgate audit search``: read the audit stream."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from bus import Bus
from bus.audit import (
    EVENT_TYPES,
    QUERY_BATCH,
    AuditEvent,
    EventsDropped,
    Login,
    SessionEnd,
    SessionQuery,
    read_events,
)
from bus.settings import NATS_HELP, resolve_nats
from bus.subjects import audit_filter
from fleetgate import aio
from fleetgate.cli.errors import UsageError
from fleetgate.durations import parse_duration


def register(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    group = sub.add_parser("audit", help="read the audit trail")
    actions = group.add_subparsers(dest="action", metavar="ACTION", required=True)
    tail = actions.add_parser("tail", help="the latest events, then new ones as they come")
    tail.add_argument("-n", type=int, default=10, help="events to show first (default 10)")
    tail.add_argument("--no-follow", action="store_true", help="stop after those")
    search = actions.add_parser("search", help="events matching filters, oldest first")
    search.add_argument("--user")
    search.add_argument("--db", help="database name")
    search.add_argument("--since", help="a duration back (1h, 30m) or an ISO time")
    search.add_argument("--limit", type=int, help="at most this many (the newest)")
    for parser in (tail, search):
        parser.add_argument(
            "--type", help=f"event type or prefix: {', '.join(EVENT_TYPES)}, db.session"
        )
        parser.add_argument(
            "--format",
            default="text",
            choices=["text", "json"],
            help="json: one audit event a line, as a JSON object (default text: a line each)",
        )
        parser.add_argument("--nats", help=NATS_HELP)
        common(parser)
    tail.set_defaults(handler=_tail)
    search.set_defaults(handler=_search)


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """``1h`` -> an hour ago; ``2026-11-25T10:00`` (UTC unless it says) -> that time."""
    now = now or datetime.now(UTC)
    try:
        return now - timedelta(seconds=parse_duration(text))
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(
            f"--since {text!r}: give a duration back (30m, 2h, 7d) or an ISO time"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def subject_for(event_type: str | None) -> str:
    if not event_type:
        return audit_filter()
    if not re.fullmatch(r"[a-z]+(\.[a-z]+)*", event_type):
        raise UsageError(f"--type {event_type!r}: expected e.g. {', '.join(EVENT_TYPES)}")
    if event_type == QUERY_BATCH:
        raise UsageError(
            f"--type {QUERY_BATCH}: batches are read as one db.session.query per command; "
            "use --type db.session.query"
        )
    return audit_filter(event_type, exact=event_type in EVENT_TYPES)


def format_event(event: AuditEvent) -> str:
    """One line per event, for people."""
    when = event.time.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    who = event.user or "-"
    if event.database:
        who += f"@{event.database}" + (f"({event.db_user})" if event.db_user else "")
    parts = [when, event.type, who, event.client_addr or "-"]
    if isinstance(event, SessionQuery):
        parts.append(" ".join([event.command, *event.args]))
    elif isinstance(event, SessionEnd):
        parts.append(
            f"{event.duration:.1f}s {event.commands} commands "
            f"{event.bytes_in}B in {event.bytes_out}B out"
        )
    elif isinstance(event, EventsDropped):
        parts.append(f"{event.dropped} events dropped on {event.host_id}")
    elif isinstance(event, Login) and event.success:
        parts.append(
            f"ok {event.method}" + (f" until {event.expires:%H:%M:%SZ}" if event.expires else "")
        )
    if not event.success and not isinstance(event, EventsDropped):
        parts.append(f"FAILED: {event.reason}")
    elif event.type == "db.session.start":
        parts.append("ok")
    if event.identity == "mismatch":
        parts.append(
            f"NOT FROM {event.host_id or '-'}: published by {event.publisher or 'another type'}"
        )
    return "  ".join(parts)


def _emit(event: AuditEvent, fmt: str) -> None:
    if fmt == "json":
        print(event.model_dump_json(), flush=True)
    else:
        print(format_event(event), flush=True)


def _matches(event: AuditEvent, user: str | None, db: str | None) -> bool:
    return (user is None or event.user == user) and (db is None or event.database == db)


def _search(args: argparse.Namespace) -> int:
    since = parse_since(args.since) if args.since else None
    subject = subject_for(args.type)

    async def go() -> list[AuditEvent]:
        async with await Bus.connect(resolve_nats(args.nats), name="fleetgate-audit") as bus:
            return [
                event
                async for event in read_events(bus, subject=subject, since=since)
                if _matches(event, args.user, args.db)
            ]

    found = aio.run(go())
    if args.limit is not None:
        found = found[-args.limit :] if args.limit > 0 else []
    for event in found:
        _emit(event, args.format)
    if not found:
        print("(no matching events)", file=sys.stderr)
    return 0


def _tail(args: argparse.Namespace) -> int:
    subject = subject_for(args.type)

    async def go() -> int:
        async with await Bus.connect(resolve_nats(args.nats), name="fleetgate-audit") as bus:
            events = read_events(
                bus, subject=subject, last=max(args.n, 0), follow=not args.no_follow
            )
            async for event in events:
                _emit(event, args.format)
        return 0

    return aio.run(go())
