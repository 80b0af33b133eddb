"""The one client every process uses to reach the bus: connect, provision, KV and watch.

Only this package imports ``nats``. A :class:`Bus` is an async context manager over one
NATS connection with JetStream; it reconnects forever in the background and tells every
open watch to resync after a reconnect (see :mod:`bus.watch`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js.api import DiscardPolicy, Placement, StorageType, StreamConfig
from nats.js.kv import KeyValue
from pydantic import BaseModel, ValidationError

from bus import subjects
from bus.errors import BusError, BusUnavailable, JetStreamUnavailable, RegistryError
from bus.schemas import DatabaseResource, FetcherStatus
from bus.servers import DbServerHeartbeat
from bus.settings import (
    NatsConnection,
)
from bus.settings import (
    inbox_prefix as inbox_prefix,
)
from bus.settings import (
    redact_url as redact_url,
)
from bus.settings import (
    url_user as url_user,
)
from bus.specs import BUCKETS, DB_SERVERS, SPECS, BucketSpec, Replication, describe_replication
from bus.watch import Event, KvWatch, describe
from fleetgate.aio import cancel_and_wait, cancellation_kept
from fleetgate.backoff import backoff_delay

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)


FAILURES: tuple[type[Exception], ...] = (
    BusError,
    nats.errors.Error,
    TimeoutError,
    OSError,
)
"""What a call to NATS may raise besides our own errors: catch these to treat NATS as
unreachable without importing nats-py outside ``bus/``."""


UNANSWERED: tuple[type[Exception], ...] = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.js.errors.ServiceUnavailableError,
)
"""How a JetStream call that nobody answered fails: a timeout, or no responders (which
nats-py's JetStream API calls report as ServiceUnavailableError): JetStream down or
unreachable (a leaf node cut off from its hub), or a refused publish."""

_RETRY_UNANSWERED = 0.1


def decode(model: type[M], key: str, data: bytes) -> M | None:
    """Parse a record; a record we cannot read is logged and skipped, never fatal."""
    try:
        return model.model_validate_json(data)
    except ValidationError as exc:
        logger.warning("skipping unreadable %s record %r: %s", model.__name__, key, exc)
        return None


class Bus:
    """One NATS connection with JetStream, and typed access to the registry."""

    def __init__(self, nc: NATS, url: str, *, request_timeout: float = 10.0) -> None:
        self.nc = nc
        self.url = redact_url(url)
        self.js = nc.jetstream(timeout=request_timeout)
        self._buckets: dict[str, KeyValue] = {}
        self._watches: set[KvWatch[Any]] = set()
        self.reconnects = 0
        self.closing = False
        self.replication: Replication | None = None
        """Replicas and placement of the buckets and audit stream this connection
        creates. Set (from a process's ``jetstream:`` config), an existing one that
        differs is refused with what differs and how to migrate it; None creates with
        R1 and uses what exists as it is."""

    # -- connection -------------------------------------------------------------------

    @classmethod
    async def connect(
        cls,
        target: str | NatsConnection,
        *,
        name: str,
        connect_timeout: float = 5.0,
        reconnect_wait: float = 0.5,
        wait: float = 0.0,
        request_timeout: float = 10.0,
    ) -> Bus:
        """Connect to NATS as ``target`` says (:func:`bus.settings.resolve_nats`: its
        servers, TLS and credentials; or a URL, one server or a comma-separated list of
        a cluster's servers: nats-py picks one and fails over to the others); raise
        BusUnavailable naming the servers (never a secret) when they stay unreachable.
        A refused connection is retried for ``wait`` seconds (0 for commands people
        type: fail at once); one attempt takes at most ``connect_timeout``. Once
        connected, reconnects never stop. Replies (requests, JetStream API answers,
        watches' deliveries) come on the user's own inbox prefix
        (:attr:`NatsConnection.inbox_prefix`)."""
        conn = NatsConnection.from_url(target) if isinstance(target, str) else target
        bus: Bus | None = None
        shown = conn.shown
        servers = list(conn.servers)
        first_errors: list[Exception] = []
        give_up = asyncio.Event()
        deadline = time.monotonic() + wait

        async def on_error(exc: Exception) -> None:
            if bus is None:  # still connecting: the caller reports it once
                first_errors.append(exc)
                # every server of the list tried at least once before giving up
                if time.monotonic() >= deadline and len(first_errors) >= len(servers):
                    give_up.set()
                return
            logger.warning("NATS %s: %s", shown, describe(exc))

        async def on_disconnect() -> None:
            if bus is not None and not bus.closing:
                logger.warning("disconnected from NATS at %s; reconnecting", shown)

        async def on_reconnect() -> None:
            logger.info("reconnected to NATS at %s", shown)
            if bus is not None:
                bus.reconnected()

        nc = NATS()
        # nats-py retries the first connect forever when reconnects are unlimited, so
        # the first connect is bounded here; unlimited reconnects apply afterwards.
        options: dict[str, Any] = {  # nats-py's hints say int; it takes float seconds
            "connect_timeout": connect_timeout,
            "reconnect_time_wait": reconnect_wait,
        }
        options.update(_credentials(conn))
        connecting = asyncio.ensure_future(
            nc.connect(
                servers,
                name=name,
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                error_cb=on_error,
                disconnected_cb=on_disconnect,
                reconnected_cb=on_reconnect,
                inbox_prefix=conn.inbox_prefix,
                **options,
            )
        )
        giving_up = asyncio.ensure_future(give_up.wait())
        try:
            await asyncio.wait(
                (connecting, giving_up),
                timeout=wait + connect_timeout + 1,
                return_when=asyncio.FIRST_COMPLETED,
            )
            giving_up.cancel()
            if not connecting.done():
                await cancel_and_wait(connecting)
                raise TimeoutError("no answer")
            connecting.result()
        except asyncio.CancelledError:
            connecting.cancel()
            giving_up.cancel()
            with contextlib.suppress(Exception):
                await nc.close()
            raise
        except (
            OSError,
            TimeoutError,
            nats.errors.NoServersError,
            nats.errors.TimeoutError,
        ) as exc:
            with contextlib.suppress(Exception):
                await nc.close()
            reason = describe(first_errors[-1] if first_errors else exc)
            raise BusUnavailable(
                f"cannot reach NATS at {shown} ({reason}); start nats-server "
                "there, or point at yours with --nats URL or FLEETGATE_NATS_SERVERS"
            ) from exc
        bus = cls(nc, shown, request_timeout=request_timeout)
        return bus

    @property
    def connected(self) -> bool:
        """Whether the connection to NATS is up now (False while reconnecting)."""
        return bool(self.nc.is_connected)

    def reconnected(self) -> None:
        """Count a reconnect and tell every open watch to resync (called by the NATS
        client's reconnect callback)."""
        self.reconnects += 1
        for watch in list(self._watches):
            watch.resync()

    async def close(self) -> None:
        """Stop every watch and close the connection (pending writes are flushed)."""
        self.closing = True
        for watch in list(self._watches):
            await watch.stop()
        if not self.nc.is_closed:
            try:
                await self.nc.drain()
            except (TimeoutError, nats.errors.Error) as exc:
                logger.debug("drain failed (%s); closing", exc)
                await self.nc.close()

    async def __aenter__(self) -> Bus:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- buckets ------------------------------------------------------------------------

    async def provision(self, *specs: BucketSpec) -> None:
        """Create the buckets that do not exist yet; an existing bucket is left as it is."""
        for spec in specs or tuple(BUCKETS.values()):
            await self._open(spec, create=True)

    async def bucket(self, name: str, *, create: bool = True) -> KeyValue:
        """The KV bucket ``name``, opened once per connection and kept; when ``create``
        (the default) a missing bucket is created with its spec from
        :data:`bus.specs.SPECS` (a name not there gets a plain one-version bucket)."""
        kv = self._buckets.get(name)
        if kv is None:
            kv = await self._open(_spec(name), create=create)
        return kv

    async def _open(self, spec: BucketSpec, *, create: bool) -> KeyValue:
        what = f"bucket {spec.name}"
        try:
            try:
                kv = await self.js.key_value(spec.name)
            except nats.js.errors.BucketNotFoundError:
                if not create:
                    raise RegistryError(
                        f"bucket {spec.name} does not exist yet: start discovery (or an "
                        "agent) once against this NATS so it is created"
                    ) from None
                await self.create_stream(_kv_stream(spec, self.wanted), what)
                kv = await self.js.key_value(spec.name)
            else:
                if create:
                    await self.check_replication(kv_stream_name(spec.name), what)
        except nats.js.errors.ServiceUnavailableError as exc:
            raise JetStreamUnavailable(
                f"no JetStream answers at {self.url}: it is not enabled there (start "
                "nats-server with -js, or 'jetstream {}' in its config), or that server is a "
                "leaf node cut off from its hub"
            ) from exc
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
            raise JetStreamUnavailable(
                f"no JetStream answer from {self.url} for bucket {spec.name}: is JetStream "
                "enabled (nats-server -js) and are we allowed to use it?"
            ) from exc
        self._buckets[spec.name] = kv
        return kv

    @property
    def wanted(self) -> Replication:
        """The replication of what this connection creates (R1 unless configured)."""
        return self.replication or Replication()

    async def create_stream(self, config: StreamConfig, what: str) -> None:
        """Create a bucket's or the audit stream's stream as :attr:`wanted`; when another
        process created it first, check theirs instead."""
        want = self.wanted
        if config.subject_delete_marker_ttl:
            info = await self.js.account_info()
            if not info.api.level or info.api.level < 1:
                raise RegistryError(
                    f"the NATS server at {self.url} is too old for {what}, whose records "
                    "expire one by one: use nats-server 2.11 or newer"
                )
        try:
            await self.js.add_stream(config)
        except nats.js.errors.ServiceUnavailableError:
            raise
        except nats.js.errors.APIError as exc:
            if exc.err_code == _STREAM_NAME_IN_USE:  # created by someone else meanwhile
                await self.check_replication(str(config.name), what)
                return
            raise RegistryError(
                f"cannot create {what} with {want.describe()} on NATS at {self.url}: "
                f"{exc.description or describe(exc)} (one nats-server holds 1 replica; R3 "
                "needs a cluster of at least 3 servers, R5 of 5; a placement needs a "
                "cluster of that name or servers with those tags): ask for what the servers "
                "have (jetstream: in a process's config, or jetstream provision's flags)"
            ) from exc

    async def check_replication(self, stream: str, what: str) -> None:
        """Refuse an existing stream whose replicas or placement differ from
        :attr:`replication` (when set), saying what differs and how to migrate."""
        want = self.replication
        if want is None:
            return
        info = await self.js.stream_info(stream)
        replicas = info.config.num_replicas or 1
        placement = info.config.placement
        cluster = placement.cluster if placement is not None else None
        tags = tuple(placement.tags or ()) if placement is not None else ()
        if want.matches(replicas, cluster, tags):
            return
        have = describe_replication(replicas, cluster, tags)
        raise RegistryError(
            f"{what} exists with {have}, but this process is configured for "
            f"{want.describe()} (jetstream: in its config); fleetgate never changes an "
            "existing stream by itself. Migrate it once as the NATS admin user: "
            f"fleetgate jetstream provision {want.edit_flags()} --migrate (or: nats "
            f"stream edit {stream} {want.edit_flags()}); or make jetstream: in this "
            f"config say {have}"
        )

    async def stream_exists(self, stream: str) -> bool:
        try:
            await self.js.stream_info(stream)
        except nats.js.errors.NotFoundError:
            return False
        return True

    async def migrate(self, stream: str) -> bool:
        """Give an existing stream :attr:`wanted`'s replicas and placement (JetStream
        adds or removes copies and moves them while it stays available), and a bucket's
        stream direct gets; False when it already had them."""
        want = self.wanted
        info = await self.js.stream_info(stream)
        config = info.config
        placement = config.placement
        bucket = stream.startswith("KV_")
        if want.matches(
            config.num_replicas or 1,
            placement.cluster if placement is not None else None,
            tuple(placement.tags or ()) if placement is not None else (),
        ) and (config.allow_direct or not bucket):
            return False
        config.num_replicas = want.replicas
        config.placement = placement_of(want)
        if bucket:
            config.allow_direct = True  # reads from every copy (see _kv_stream)
        await self.js.update_stream(config)
        return True

    # -- generic typed KV ---------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def kv_call(
        self, what: str, bucket: str, key: str, *, reopen: bool = False
    ) -> AsyncIterator[None]:
        """Around one call on a bucket from :meth:`bucket`: turn its silence into an
        error that says what to check. NATS answers a refused publish with no reply at
        all, so a timeout is also how a permission problem looks from here (the server
        logs the violation).

        With ``reopen`` every NATS error becomes :class:`RegistryError`, and after any
        failure the bucket is opened again on the next call (and created again, should
        NATS have lost its store: a missing stream answers like a refusal, with no
        responders). A cancellation that nats-py lost on the way (Python 3.11) is raised
        at the end (:func:`fleetgate.aio.cancellation_kept`)."""
        try:
            try:
                with cancellation_kept():
                    yield
            except UNANSWERED as exc:
                raise RegistryError(
                    f"no answer to {what} {bucket}/{key} on {self.url} ({describe(exc)}): "
                    "is JetStream up, and may this NATS user do that?"
                ) from exc
        except RegistryError:
            if reopen:
                self._buckets.pop(bucket, None)
            raise
        except nats.errors.Error as exc:
            if not reopen:
                raise
            self._buckets.pop(bucket, None)
            raise RegistryError(f"{what} {bucket}/{key} failed: {describe(exc)}") from exc

    async def put(self, bucket: str, key: str, record: BaseModel) -> int:
        kv = await self.bucket(bucket)
        async with self.kv_call("a write to", bucket, key):
            return int(await kv.put(key, record.model_dump_json(exclude_none=True).encode()))

    async def get(self, bucket: str, key: str, model: type[M], *, wait: float = 0.0) -> M | None:
        """The record at ``key`` (None when absent). While JetStream does not answer at
        all (behind a leaf node that is moving to another hub server, or a stream
        electing its leader after a server was lost), the read is tried again for up to
        ``wait`` seconds before RegistryError."""
        deadline = time.monotonic() + wait
        while True:
            try:
                return await self._get(bucket, key, model)
            except RegistryError as exc:
                if not isinstance(exc.__cause__, UNANSWERED) or time.monotonic() >= deadline:
                    raise
            await asyncio.sleep(_RETRY_UNANSWERED)

    async def _get(self, bucket: str, key: str, model: type[M]) -> M | None:
        kv = await self.bucket(bucket)
        async with self.kv_call("a read of", bucket, key):
            try:
                entry = await kv.get(key)
            except nats.js.errors.KeyNotFoundError:
                return None
        return decode(model, key, entry.value or b"")

    async def delete(self, bucket: str, key: str) -> None:
        kv = await self.bucket(bucket)
        async with self.kv_call("a delete in", bucket, key):
            await kv.delete(key)

    def watch(
        self,
        bucket: str,
        model: type[M],
        *,
        keys: str = ">",
        create: bool = True,
        retry_open: bool = True,
    ) -> AsyncGenerator[Event[M], None]:
        """Snapshot, then :class:`~bus.watch.Synced`, then changes; resyncs after reconnects.
        With ``retry_open`` False a watch that cannot be opened raises RegistryError
        instead of retrying (for one-shot reads). Close it when done (``aclosing``): a
        generator left to the garbage collector stops its NATS consumer late, maybe
        after the connection closed, and that consumer's heartbeat task lingers."""
        watch: KvWatch[M] = KvWatch(
            open_bucket=lambda: self.bucket(bucket, create=create),
            keys=keys,
            decode=lambda key, data: decode(model, key, data),
            retry_open=retry_open,
        )
        return self._run_watch(watch)

    async def _run_watch(self, watch: KvWatch[M]) -> AsyncGenerator[Event[M], None]:
        self._watches.add(watch)
        try:
            async for event in watch:
                yield event
        finally:
            self._watches.discard(watch)
            await watch.stop()

    async def snapshot(
        self, bucket: str, model: type[M], *, keys: str = ">", create: bool = True
    ) -> dict[str, M]:
        """Every record of a bucket now, keyed by KV key."""
        out: dict[str, M] = {}
        watch = self.watch(bucket, model, keys=keys, create=create, retry_open=False)
        async with contextlib.aclosing(watch) as events:
            async for event in events:
                if event.kind == "synced":
                    break
                if event.kind == "upsert" and event.value is not None:
                    out[event.key] = event.value
        return out

    # -- the registry of databases ------------------------------------------------------

    async def put_resource(self, resource: DatabaseResource) -> int:
        return await self.put(
            subjects.DATABASES_BUCKET, subjects.database_key(resource.name), resource
        )

    async def delete_resource(self, name: str) -> None:
        await self.delete(subjects.DATABASES_BUCKET, subjects.database_key(name))

    async def get_resource(self, name: str) -> DatabaseResource | None:
        return await self.get(
            subjects.DATABASES_BUCKET, subjects.database_key(name), DatabaseResource
        )

    async def list_resources(self, *, create: bool = True) -> list[DatabaseResource]:
        found = await self.snapshot(subjects.DATABASES_BUCKET, DatabaseResource, create=create)
        return sorted(found.values(), key=lambda r: r.name)

    def watch_resources(self) -> AsyncGenerator[Event[DatabaseResource], None]:
        return self.watch(subjects.DATABASES_BUCKET, DatabaseResource)

    async def put_fetcher_status(self, status: FetcherStatus) -> int:
        key = subjects.fetcher_status_key(status.group, status.fetcher)
        return await self.put(subjects.DISCOVERY_STATUS_BUCKET, key, status)

    async def list_fetcher_status(self) -> list[FetcherStatus]:
        found = await self.snapshot(subjects.DISCOVERY_STATUS_BUCKET, FetcherStatus)
        return list(found.values())

    # -- expiring records (agent heartbeats) ------------------------------------------

    async def put_expiring(self, bucket: str, key: str, record: BaseModel, ttl: float) -> int:
        """Put a record that the server removes ``ttl`` seconds (rounded up) after this
        write unless it is written again."""
        data = record.model_dump_json(exclude_none=True).encode()
        return await self._publish_ttl(bucket, key, data, {}, ttl)

    async def delete_expiring(self, bucket: str, key: str, marker_ttl: float = 60.0) -> None:
        """Delete a key now, leaving a delete marker that itself expires."""
        await self._publish_ttl(bucket, key, b"", {"KV-Operation": "PURGE"}, marker_ttl)

    async def _publish_ttl(
        self, bucket: str, key: str, data: bytes, headers: dict[str, str], ttl: float
    ) -> int:
        await self.bucket(bucket)
        subject = subjects.kv_subject(bucket, key)
        headers = {**headers, "Nats-TTL": str(max(1, math.ceil(ttl)))}
        try:
            ack = await self.js.publish(subject, data, headers=dict(headers))
        except nats.js.errors.NoStreamResponseError:
            # No stream behind the subject: the bucket was deleted, or NATS lost its store.
            self._buckets.pop(bucket, None)
            await self.bucket(bucket)
            ack = await self.js.publish(subject, data, headers=dict(headers))
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code != 10166:  # per-message TTL is disabled on this bucket
                raise
            await self._allow_msg_ttl(bucket)
            ack = await self.js.publish(subject, data, headers=dict(headers))
        return int(ack.seq)

    async def _allow_msg_ttl(self, bucket: str) -> None:
        """Turn on per-message TTLs for a bucket created by older tools."""
        spec = _spec(bucket)
        try:
            info = await self.js.stream_info(f"KV_{bucket}")
            config = info.config
            config.allow_msg_ttl = True
            config.subject_delete_marker_ttl = spec.marker_ttl
            await self.js.update_stream(config)
        except nats.errors.Error as exc:
            raise RegistryError(
                f"bucket {bucket} does not allow per-record TTLs and we may not change it "
                f"({describe(exc)}): recreate it, or let an admin run an agent once"
            ) from exc
        logger.info("enabled per-message TTLs on bucket %s", bucket)

    async def put_db_server(self, heartbeat: DbServerHeartbeat, ttl: float) -> int:
        key = subjects.db_server_key(heartbeat.name, heartbeat.host_id)
        return await self.put_expiring(subjects.DB_SERVERS_BUCKET, key, heartbeat, ttl)

    async def delete_db_server(self, database: str, host_id: str) -> None:
        key = subjects.db_server_key(database, host_id)
        await self.delete_expiring(subjects.DB_SERVERS_BUCKET, key, DB_SERVERS.marker_ttl or 60.0)

    async def list_db_servers(
        self, database: str | None = None, *, create: bool = True
    ) -> list[DbServerHeartbeat]:
        """Live heartbeats, of one database or of all; expired ones are already gone."""
        keys = subjects.db_servers_of(database) if database is not None else ">"
        found = await self.snapshot(
            subjects.DB_SERVERS_BUCKET, DbServerHeartbeat, keys=keys, create=create
        )
        return [hb for hb in found.values() if database is None or hb.name == database]


class PlaintextRefused(ConnectionError):
    """A server did not start TLS although TLS is configured: the password or token is
    not sent (nats-py starts TLS only when the server asks for it)."""


START_RETRY = (0.5, 1.0, 2.0)
"""Seconds between tries of :func:`when_jetstream_answers` (the last one repeats)."""

R = TypeVar("R")


async def when_jetstream_answers(step: Callable[[], Awaitable[R]], *, wait: float, what: str) -> R:
    """``step`` (a process's start: its buckets and streams set up), tried again while
    JetStream does not answer, for ``wait`` seconds at most; then its error.

    At start JetStream may not answer for a while: a leaf node's link to its hub is
    being made, a JetStream leader is being elected, or a replicated stream another
    process is creating takes longer than a request's timeout on a busy cluster. One
    lost answer should not stop a process that would find everything in place a second
    later (a stream created meanwhile is found, not created twice)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    attempt = 0
    while True:
        try:
            return await step()
        except JetStreamUnavailable as exc:
            delay = backoff_delay(START_RETRY, attempt)
            left = deadline - loop.time()
            if left < delay:
                raise
            if attempt == 0:
                logger.warning("%s: %s; trying again for up to %.0f s", what, exc, left)
            attempt += 1
            await asyncio.sleep(delay)


def _credentials(conn: NatsConnection) -> dict[str, Any]:
    """nats-py's options for the TLS and the credentials ``conn`` holds. With TLS, a
    password or a token is handed over only on a connection whose TLS handshake
    completed: nats-py asks for them (callbacks) just before it sends CONNECT."""
    options: dict[str, Any] = {}
    tls = conn.new_tls()

    def guarded(secret: str) -> str | Callable[[], str]:
        if tls is None:
            return secret
        handshake_done = tls[1]

        def give() -> str:
            if not handshake_done():
                raise PlaintextRefused(
                    "the server did not start TLS, so the NATS password or token was "
                    "not sent: require TLS on the server (tls {...} in its config), or "
                    "drop the client's tls section"
                )
            return secret

        return give

    if tls is not None:
        options["tls"] = tls[0]
        options["tls_handshake_first"] = conn.tls_handshake_first
        if conn.tls_hostname:
            options["tls_hostname"] = conn.tls_hostname
    if conn.user is not None and conn.password is not None:
        options["user"] = conn.user
        options["password"] = guarded(conn.password)
    if conn.token is not None:
        options["token"] = guarded(conn.token)
    if conn.nkey_seed_file is not None:
        options["nkeys_seed"] = conn.nkey_seed_file
    if conn.creds_file is not None:
        options["user_credentials"] = conn.creds_file
    return options


def _spec(name: str) -> BucketSpec:
    return SPECS.get(name) or BucketSpec(name, name)


_STREAM_NAME_IN_USE = 10058
"""JetStream's error code for a stream created meanwhile with another config."""

_DUPLICATE_WINDOW = 120.0


def kv_stream_name(bucket: str) -> str:
    """The JetStream stream that holds a KV bucket."""
    return f"KV_{bucket}"


def placement_of(replication: Replication) -> Placement | None:
    """The JetStream placement of a stream replicated as ``replication``."""
    if not replication.placed:
        return None
    return Placement(cluster=replication.cluster, tags=list(replication.tags) or None)


def _kv_stream(spec: BucketSpec, replication: Replication) -> StreamConfig:
    """A bucket's stream, as nats-py's ``create_key_value`` makes it, with placement
    (which ``create_key_value`` does not pass on) and direct gets: every copy answers
    reads, so they go on while the stream elects a new leader after losing a server
    (what other NATS clients make a bucket with; a read may then trail a write by
    moments, which compare-and-set writes tolerate by design)."""
    window = min(_DUPLICATE_WINDOW, spec.ttl) if spec.ttl else _DUPLICATE_WINDOW
    return StreamConfig(
        name=kv_stream_name(spec.name),
        description=spec.description,
        subjects=[f"$KV.{spec.name}.>"],
        allow_rollup_hdrs=True,
        allow_direct=True,
        allow_msg_ttl=True,
        deny_delete=True,
        discard=DiscardPolicy.NEW,
        duplicate_window=window,
        max_age=spec.ttl,
        max_consumers=-1,
        max_msgs=-1,
        max_msgs_per_subject=spec.history,
        num_replicas=replication.replicas,
        placement=placement_of(replication),
        storage=StorageType.FILE,
        subject_delete_marker_ttl=spec.marker_ttl,
    )


WatchFactory = Callable[[], AsyncIterator[Event[Any]]]
