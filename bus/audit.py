"""Audit events: their records, and the JetStream stream that keeps them.

Every event goes to ``fleetgate.audit.<type>`` (so NATS permissions and ``--type``
filters work on subjects) and carries a unique ``id``, sent as ``Nats-Msg-Id``: a
publish retried after a lost acknowledgement is stored once.

Event types:

| type               | when                                                           |
|--------------------|----------------------------------------------------------------|
| db.session.start   | a client connected to an agent: success, or failure + reason   |
| db.session.query   | every client command (AUTH/HELLO secrets masked)               |
| db.session.end     | the session closed: duration, commands, bytes each way         |
| auth.login         | a login or ``auth sign``: success, or failure + reason         |
| audit.dropped      | an emitter's queue overflowed: how many events were lost       |
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Final, Literal

import nats.errors
import nats.js.errors
from nats.js.api import ConsumerConfig, DeliverPolicy, StorageType, StreamConfig
from pydantic import Field, TypeAdapter, ValidationError

from bus import subjects
from bus.client import Bus
from bus.errors import RegistryError
from bus.schemas import SCHEMA_VERSION, Record

DEFAULT_MAX_AGE: Final = 90 * 86400.0
"""Audit retention when not configured: 90 days."""

EVENT_TYPES: Final = (
    "db.session.start",
    "db.session.query",
    "db.session.end",
    "auth.login",
    "audit.dropped",
)


def _now() -> datetime:
    return datetime.now(UTC)


def _new_id() -> str:
    return uuid.uuid4().hex


class AuditEvent(Record):
    """Fields every event has. Unknown event types from newer writers read as this."""

    type: str
    id: str = Field(default_factory=_new_id)
    time: datetime = Field(default_factory=_now)
    user: str = ""
    roles: tuple[str, ...] = ()
    database: str = ""
    db_user: str = ""
    client_addr: str = ""
    host_id: str = ""
    """The agent (or auth service) that emitted the event."""
    session_id: str = ""
    success: bool = True
    reason: str = ""
    """Why it failed (failures), or a note."""
    schema_version: int = SCHEMA_VERSION


class SessionStart(AuditEvent):
    type: Literal["db.session.start"] = "db.session.start"


class SessionQuery(AuditEvent):
    type: Literal["db.session.query"] = "db.session.query"
    command: str = ""
    """The command name, upper case (``GET``)."""
    args: tuple[str, ...] = ()
    """Arguments after the name, secrets masked, maybe redacted or truncated."""


class SessionEnd(AuditEvent):
    type: Literal["db.session.end"] = "db.session.end"
    duration: float = 0.0
    """Seconds from start to end."""
    commands: int = 0
    bytes_in: int = 0
    """From the client to the database."""
    bytes_out: int = 0
    """From the database to the client."""


class Login(AuditEvent):
    type: Literal["auth.login"] = "auth.login"
    method: str = "password"
    """``password``, ``password+totp`` or ``sign``."""
    expires: datetime | None = None
    """Expiry of the issued certificate (success only)."""


class EventsDropped(AuditEvent):
    type: Literal["audit.dropped"] = "audit.dropped"
    dropped: int = 0
    """Events lost since the previous report because the emitter's queue was full."""


KnownEvent = Annotated[
    SessionStart | SessionQuery | SessionEnd | Login | EventsDropped, Field(discriminator="type")
]
_KNOWN: TypeAdapter[KnownEvent] = TypeAdapter(KnownEvent)


def parse_event(data: bytes) -> AuditEvent | None:
    """An event from its JSON; a type this version does not know reads as AuditEvent."""
    try:
        return _KNOWN.validate_json(data)
    except ValidationError:
        try:
            return AuditEvent.model_validate_json(data)
        except ValidationError:
            return None


def encode_event(event: AuditEvent) -> bytes:
    return event.model_dump_json().encode()


# -- the stream ----------------------------------------------------------------------


async def ensure_audit_stream(
    bus: Bus, *, max_age: float = DEFAULT_MAX_AGE, update: bool = True
) -> None:
    """Create the audit stream, or set its retention to ``max_age`` seconds (unless
    ``update`` is False: agents create a missing stream but leave retention to the
    auth service and admins)."""
    config = StreamConfig(
        name=subjects.AUDIT_STREAM,
        description="fleetgate audit events",
        subjects=[subjects.audit_filter()],
        storage=StorageType.FILE,
        max_age=max_age,
        duplicate_window=120.0,
    )
    try:
        try:
            info = await bus.js.stream_info(subjects.AUDIT_STREAM)
        except nats.js.errors.NotFoundError:
            await bus.js.add_stream(config)
            return
        if update and info.config.max_age != max_age:
            await bus.js.update_stream(config)
    except nats.js.errors.ServiceUnavailableError as exc:
        raise RegistryError(
            f"JetStream is not enabled on the NATS server at {bus.url}: start it with -js"
        ) from exc
    except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
        raise RegistryError(f"no JetStream answer from {bus.url} for the audit stream") from exc


async def publish_event(bus: Bus, event: AuditEvent, *, ack_wait: float = 2.0) -> None:
    """Store one event; raises nats errors (the emitter retries, dedup keeps it single)."""
    await bus.js.publish(
        subjects.audit_subject(event.type),
        encode_event(event),
        timeout=ack_wait,
        stream=subjects.AUDIT_STREAM,
        headers={"Nats-Msg-Id": event.id},
    )


async def read_events(
    bus: Bus,
    *,
    subject: str | None = None,
    since: datetime | None = None,
    follow: bool = False,
    last: int | None = None,
    idle: float = 1.0,
) -> AsyncIterator[AuditEvent]:
    """Events from the stream, oldest first: from ``since`` (or the last ``last``, or all),
    stopping when caught up unless ``follow``. ``subject`` narrows by event type."""
    filter_subject = subject or subjects.audit_filter()
    config = ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
    if since is not None:
        config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_TIME, opt_start_time=since)
    elif follow and last is None:
        config = ConsumerConfig(deliver_policy=DeliverPolicy.NEW)
    try:
        stream = await bus.js.stream_info(subjects.AUDIT_STREAM)
    except nats.js.errors.NotFoundError:
        raise RegistryError(
            "there is no audit stream yet: it is created when the auth service or an agent "
            "first starts against this NATS"
        ) from None
    if last is not None and since is None and filter_subject == subjects.audit_filter():
        # Unfiltered: start at the right sequence instead of replaying the stream.
        first = max(stream.state.first_seq, stream.state.last_seq - last + 1, 1)
        config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=first)
    sub = await bus.js.subscribe(
        filter_subject, stream=subjects.AUDIT_STREAM, ordered_consumer=True, config=config
    )
    try:
        info = await sub.consumer_info()
        # A consistent count at the server: delivered (maybe in flight) plus not yet.
        delivered = info.delivered.consumer_seq if info.delivered else 0
        total = (info.num_pending or 0) + (delivered or 0)
        skip = max(0, total - last) if last is not None else 0
        if total == 0 and not follow:
            return
        while True:
            try:
                msg = await sub.next_msg(timeout=idle if not follow else 3600)
            except nats.errors.TimeoutError:
                if follow:
                    continue
                return
            if skip:
                skip -= 1
            else:
                event = parse_event(msg.data)
                if event is not None:
                    yield event
            if not follow and msg.metadata.num_pending == 0:
                return
    finally:
        await asyncio.shield(sub.unsubscribe())
