"""Audit events: their records, and the JetStream stream that keeps them.

Every event goes to ``fleetgate.audit.<type>`` (so NATS permissions and ``--type``
filters work on subjects) and carries a unique ``id``, sent as ``Nats-Msg-Id``: a
publish retried after a lost acknowledgement is stored once.

A session's commands travel in batches: one ``db.session.queries`` message (the
session's common fields once, then each command with its own time, name, arguments,
success and reason) on the ``db.session.query`` subject, so subject filters and NATS
permissions for ``db.session.query`` cover them. Readers never see a batch:
:func:`read_events` expands it into one :class:`SessionQuery` per command, with the id
``<batch id>:<n>`` (``n`` the command's number in its session, from ``first_seq``).
A session's last batch also carries its ``db.session.end`` (``end``: the event's own
fields; the common ones are the batch's), so a session that ends with commands still
buffered costs no message for its end; readers get it back as a :class:`SessionEnd`
after the commands, and a filter on ``db.session.end`` finds it (:func:`read_events`
also reads the subject of the batches for it, and keeps of each message only the events
its filter asks for).

Event types:

| type               | when                                                           |
|--------------------|----------------------------------------------------------------|
| db.session.start   | a client connected to an agent: success, or failure + reason   |
| db.session.query   | every client command (AUTH/HELLO secrets masked); stored in    |
|                    | ``db.session.queries`` batches, read back one per command      |
| db.session.end     | the session closed: duration, commands, bytes each way         |
| auth.login         | a login or ``auth sign``: success, or failure + reason         |
| audit.dropped      | an emitter's queue overflowed: how many events were lost       |
"""

from __future__ import annotations

import asyncio
import uuid
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any, Final, Literal

import nats.errors
import nats.js.errors
import orjson
from nats.js.api import ConsumerConfig, DeliverPolicy, StorageType, StreamConfig
from pydantic import Field, TypeAdapter, ValidationError

from bus import subjects
from bus.client import Bus, placement_of
from bus.errors import JetStreamUnavailable, RegistryError
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
"""The event types readers see (a ``db.session.queries`` batch reads as its commands)."""

QUERY_BATCH: Final = "db.session.queries"
"""The wire type of a batch of a session's commands, published on the subject of
``db.session.query``."""


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
    """The agent (or auth service) that emitted the event, as the event says."""
    publisher: str = ""
    """Set by :func:`read_events` from the subject, never taken from the message: the
    host token NATS let publish it (an agent may publish only on subjects ending in its
    own host_id), ``""`` for events of older writers (subjects without a host)."""
    identity: Literal["checked", "unchecked", "mismatch"] = "unchecked"
    """Set by :func:`read_events`: ``checked`` when ``host_id`` is the publisher's,
    ``mismatch`` when another publisher claims it (a forgery: do not trust ``host_id``),
    ``unchecked`` for events of older writers."""
    session_id: str = ""
    success: bool = True
    reason: str = ""
    """Why it failed (failures), or a note."""
    principal: str = ""
    """The AWS identity (the ARN STS returned) of a user logged in with
    ``fleetgate login --aws``; empty for others."""
    schema_version: int = SCHEMA_VERSION

    def expand(self) -> list[AuditEvent]:
        """The events this message stands for: itself (a batch: one per command)."""
        return [self]


class SessionStart(AuditEvent):
    type: Literal["db.session.start"] = "db.session.start"


class SessionQuery(AuditEvent):
    type: Literal["db.session.query"] = "db.session.query"
    command: str = ""
    """The command name, upper case (``GET``)."""
    args: tuple[str, ...] = ()
    """Arguments after the name, secrets masked, maybe redacted or truncated."""


class BatchedQuery(Record):
    """One command of a :class:`SessionQueries` batch."""

    time: datetime
    """When the agent saw it (on the wire: Unix time in seconds)."""
    command: str = ""
    args: tuple[str, ...] = ()
    success: bool = True
    reason: str = ""


class BatchedEnd(Record):
    """The session's ``db.session.end``, carried by its last batch."""

    id: str
    time: datetime
    success: bool = True
    reason: str = ""
    duration: float = 0.0
    commands: int = 0
    bytes_in: int = 0
    bytes_out: int = 0


class SessionQueries(AuditEvent):
    """Several commands of one session in one message; readers expand it."""

    type: Literal["db.session.queries"] = "db.session.queries"
    first_seq: int = 1
    """The number, in its session (from 1), of the first command here."""
    queries: tuple[BatchedQuery, ...] = ()
    end: BatchedEnd | None = None
    """The session's end event, in its last batch (when the session ended with
    commands still buffered)."""

    def expand(self) -> list[AuditEvent]:
        """One :class:`SessionQuery` per command (ids ``<batch id>:<n>``), then the
        session's :class:`SessionEnd` when the batch carries it."""
        common = self.model_dump(
            include={
                "user",
                "roles",
                "database",
                "db_user",
                "client_addr",
                "host_id",
                "session_id",
                "principal",
                "schema_version",
                "publisher",
                "identity",
            }
        )
        events: list[AuditEvent] = [
            SessionQuery(
                **common,
                id=f"{self.id}:{self.first_seq + i}",
                time=q.time,
                command=q.command,
                args=q.args,
                success=q.success,
                reason=q.reason,
            )
            for i, q in enumerate(self.queries)
        ]
        if self.end is not None:
            events.append(SessionEnd(**common, **self.end.model_dump()))
        return events


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
    SessionStart | SessionQuery | SessionQueries | SessionEnd | Login | EventsDropped,
    Field(discriminator="type"),
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


def encode_query(
    when: float, command: str, args: Sequence[str], success: bool = True, reason: str = ""
) -> bytes:
    """One command of a batch as JSON (a :class:`BatchedQuery`; ``when`` in Unix seconds).
    Bytes are not tracked by the garbage collector: a buffer of them costs it nothing."""
    if success and not reason:
        return orjson.dumps({"time": when, "command": command, "args": args})
    return orjson.dumps(
        {"time": when, "command": command, "args": args, "success": success, "reason": reason}
    )


_QUERY_TYPE: Final = "db.session.query"
"""The subject type of a batch (``db.session.queries``)."""
_QUERY_SUBJECT: Final = subjects.audit_subject(_QUERY_TYPE)


def wire_type(event_type: str) -> str:
    """The type in an event's subject (a batch travels on ``db.session.query``)."""
    return _QUERY_TYPE if event_type == QUERY_BATCH else event_type


@dataclass(frozen=True, slots=True)
class QueryBatch:
    """A batch as the emitter builds it: commands already encoded one by one
    (:func:`encode_query`), joined into one message, and maybe the session's end. It
    reads back as a :class:`SessionQueries`."""

    common: Mapping[str, Any]
    """The session's fields: user, roles, database, db_user, client_addr, host_id,
    session_id (and principal, for an AWS identity)."""
    first_seq: int
    queries: Sequence[bytes]
    id: str = field(default_factory=_new_id)
    time: datetime = field(default_factory=_now)
    end: SessionEnd | None = None
    """The session's end event (with the session's last commands)."""

    def __len__(self) -> int:
        """The events it stands for."""
        return len(self.queries) + (self.end is not None)

    def encode(self) -> bytes:
        head: dict[str, Any] = {
            "type": QUERY_BATCH,
            "id": self.id,
            "time": self.time,
            **self.common,
            "schema_version": SCHEMA_VERSION,
            "first_seq": self.first_seq,
        }
        if self.end is not None:
            head["end"] = self.end.model_dump(
                include={
                    "id", "time", "success", "reason", "duration", "commands", "bytes_in",
                    "bytes_out",
                }
            )  # fmt: skip
        encoded = orjson.dumps(head)
        return b"".join((encoded[:-1], b',"queries":[', b",".join(self.queries), b"]}"))

    def event(self) -> SessionQueries:
        return SessionQueries.model_validate_json(self.encode())

    def expand(self) -> list[AuditEvent]:
        return self.event().expand()


@dataclass(frozen=True, slots=True)
class Spooled:
    """An event or batch as it waits in an agent's audit spool: already encoded."""

    subject: str
    id: str
    events: int
    """Events it stands for (a batch: its commands)."""
    data: bytes

    def __len__(self) -> int:
        return self.events


def spooled(event: AuditEvent | QueryBatch) -> Spooled:
    """``event`` encoded as it is published."""
    if isinstance(event, QueryBatch):
        host = str(event.common.get("host_id", ""))
        subject = subjects.audit_subject(_QUERY_TYPE, host)
        return Spooled(subject, event.id, len(event), event.encode())
    subject = subjects.audit_subject(event.type, event.host_id)
    return Spooled(subject, event.id, 1, encode_event(event))


_LEGACY: Final = frozenset(subjects.audit_subject(t) for t in EVENT_TYPES)
"""Subjects of events spooled by an older agent (no host token)."""


def _current_subject(item: Spooled) -> str:
    """The subject to publish a spooled item on: an older agent spooled it without its
    host, which an agent's own NATS rights now refuse, so the host is added from the
    message itself."""
    if item.subject not in _LEGACY:
        return item.subject
    try:
        head = orjson.loads(item.data)
        return subjects.audit_subject(wire_type(str(head["type"])), str(head.get("host_id", "")))
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return item.subject


Outgoing = AuditEvent | QueryBatch | Spooled
"""What an emitter publishes: an event, a batch of a session's commands, or either
read back from the spool."""


# -- the stream ----------------------------------------------------------------------


async def ensure_audit_stream(
    bus: Bus, *, max_age: float = DEFAULT_MAX_AGE, update: bool = True
) -> None:
    """Create the audit stream (replicas and placement: ``bus.replication``), or set its
    retention to ``max_age`` seconds (unless ``update`` is False: agents create a missing
    stream but leave retention to the auth service and admins). An existing stream with
    other replicas or placement than configured is refused (:meth:`Bus.check_replication`)."""
    what = f"the audit stream {subjects.AUDIT_STREAM}"
    config = StreamConfig(
        name=subjects.AUDIT_STREAM,
        description="fleetgate audit events",
        subjects=[subjects.audit_filter()],
        storage=StorageType.FILE,
        max_age=max_age,
        duplicate_window=120.0,
        num_replicas=bus.wanted.replicas,
        placement=placement_of(bus.wanted),
    )
    try:
        try:
            info = await bus.js.stream_info(subjects.AUDIT_STREAM)
        except nats.js.errors.NotFoundError:
            await bus.create_stream(config, what)
            return
        await bus.check_replication(subjects.AUDIT_STREAM, what)
        if update and info.config.max_age != max_age:
            # only the retention: replicas and placement stay as they are
            info.config.max_age = max_age
            await bus.js.update_stream(info.config)
    except nats.js.errors.ServiceUnavailableError as exc:
        raise JetStreamUnavailable(
            f"JetStream is not enabled on the NATS server at {bus.url}: start it with -js"
        ) from exc
    except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
        raise JetStreamUnavailable(
            f"no JetStream answer from {bus.url} for the audit stream"
        ) from exc


_CARRIED: Final = (subjects.audit_subject("db.session.end"),)
"""The subjects of the events a batch may carry besides its commands."""


async def publish_event(bus: Bus, event: Outgoing, *, ack_wait: float = 2.0) -> None:
    """Store one event or batch; raises nats errors (the emitter retries, dedup keeps it
    single)."""
    if isinstance(event, Spooled):
        subject, data = _current_subject(event), event.data
    else:
        item = spooled(event)
        subject, data = item.subject, item.data
    await bus.js.publish(
        subject,
        data,
        timeout=ack_wait,
        stream=subjects.AUDIT_STREAM,
        headers={"Nats-Msg-Id": event.id},
    )


def checked(event: AuditEvent, subject: str) -> AuditEvent:
    """``event`` with :attr:`~AuditEvent.publisher` and :attr:`~AuditEvent.identity`
    taken from the subject it was stored on (whatever the message said of them)."""
    publisher = subjects.audit_publisher(subject, wire_type(event.type))
    if publisher is None:  # stored on another type's subject: nothing vouches for it
        publisher, identity = "", "mismatch"
    elif publisher == "":
        identity = "unchecked"
    elif publisher == subjects.audit_host_token(event.host_id):
        identity = "checked"
    else:
        identity = "mismatch"
    return event.model_copy(update={"publisher": publisher, "identity": identity})


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
    stopping when caught up unless ``follow``. ``subject`` narrows by event type. Batches
    of commands come out as one :class:`SessionQuery` per command."""
    filter_subject = subject or subjects.audit_filter()
    # A session's end may ride in its last batch, on the batches' subject: a filter that
    # asks for ends reads that subject too, and each message is cut down to the events
    # the filter asks for.
    filters = [filter_subject]
    if any(subjects.subject_matches(filter_subject, s) for s in _CARRIED) and not (
        subjects.subject_matches(filter_subject, _QUERY_SUBJECT)
    ):
        filters.append(_QUERY_SUBJECT)
    narrow = filter_subject != subjects.audit_filter()
    config = ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
    if since is not None:
        config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_TIME, opt_start_time=since)
    elif follow and last is None:
        config = ConsumerConfig(deliver_policy=DeliverPolicy.NEW)
    wire = [w for f in filters for w in subjects.audit_wire_filters(f)]
    if len(wire) > 1:
        config.filter_subjects = wire
    try:
        stream = await bus.js.stream_info(subjects.AUDIT_STREAM)
    except nats.js.errors.NotFoundError:
        raise RegistryError(
            "there is no audit stream yet: it is created when the auth service or an agent "
            "first starts against this NATS"
        ) from None
    if last is not None and since is None and filter_subject == subjects.audit_filter():
        # Unfiltered: start at the right sequence instead of replaying the stream (each
        # message holds at least one event, so the last ``last`` messages are enough).
        first = max(stream.state.first_seq, stream.state.last_seq - last + 1, 1)
        config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=first)
    sub = await bus.js.subscribe(
        wire[0], stream=subjects.AUDIT_STREAM, ordered_consumer=True, config=config
    )
    # With ``last``, events are held here until caught up, then the newest ``last`` go out.
    tail: deque[AuditEvent] | None = deque(maxlen=last) if last is not None else None
    try:
        info = await sub.consumer_info()
        # A consistent count at the server: delivered (maybe in flight) plus not yet.
        delivered = info.delivered.consumer_seq if info.delivered else 0
        total = (info.num_pending or 0) + (delivered or 0)
        # Each message holds at least one event the filter asks for, except a batch read
        # only for the end it may carry: then nothing is skipped unread.
        skip = max(0, total - last) if last is not None and len(filters) == 1 else 0
        if total == 0:
            if not follow:
                return
            tail = None
        while True:
            try:
                msg = await sub.next_msg(timeout=idle if not follow else 3600)
            except nats.errors.TimeoutError:
                if follow:
                    continue
                break
            if skip:
                skip -= 1
            else:
                event = parse_event(msg.data)
                if event is not None:
                    event = checked(event, msg.subject)
                batch = isinstance(event, SessionQueries)
                for one in event.expand() if event is not None else ():
                    if batch and since is not None and one.time < since:
                        continue  # in a batch stored after ``since``, from before it
                    if narrow and not subjects.subject_matches(
                        filter_subject, subjects.audit_subject(one.type)
                    ):
                        continue  # the other events of a batch read for its end
                    if tail is not None:
                        tail.append(one)
                    else:
                        yield one
            if msg.metadata.num_pending == 0:
                if tail is not None:
                    for one in tail:
                        yield one
                    tail = None
                if not follow:
                    return
        for one in tail or ():
            yield one
    finally:
        await asyncio.shield(sub.unsubscribe())
