"""The agent's client listener: mutual TLS, the route, the roles, then the proxy.

For each accepted connection, in order (each refusal is a ``-ERR <reason>`` line to the
client, when TLS is up, and a failed ``db.session.start`` audit event):

1. TLS handshake with the context of the current fleet CA (:class:`FleetTrust`, which
   follows the CA record in the registry, so a new or rotated CA applies to the next
   connection). A certificate from another CA fails inside the handshake (audited with the
   client address). OpenSSL is told to *request* a certificate and to skip only the
   validity dates; the agent then checks everything itself
   (:func:`~dbservice.access.ca.identity_from_ssl`: chain, dates, identity), so a client
   without a certificate or with an expired one is told why in words, and an expired
   one is audited with its user. A certificate accepted before is not parsed and
   verified again (:class:`~dbservice.access.ca.ClientVerifier`, bounded, replaced with
   the CA); its dates and its CA's are still checked on every connection.
2. The route: from the TLS server name when the client put one there
   (``<db_user>.<database>.fleetgate``, :func:`~dbservice.route.route_from_server_name`,
   captured by the context's ``sni_callback``), else from the client's first command
   (:func:`~dbservice.route.read_opening`): the route preamble, or an ``AUTH``/``HELLO``
   whose user name is ``<db_user>@<database>``, by the handshake's deadline (below). All
   lead to the same checks below; only the preamble is answered with ``+OK``. Such an
   ``AUTH``/``HELLO`` becomes the session's first command, with the db user alone as
   user name (:func:`with_first_command`), answered as on a connection routed by name.
3. Not cut off from the fleet for longer than ``offline_grace``
   (:class:`~dbservice.gateway.offline.FleetLink`), nor holding a full audit spool; the
   database must be one this agent serves.
4. :func:`~dbservice.access.authorize.grant_for` with the roles named in the
   certificate, as the listener's watch of the registry last delivered them
   (:class:`~dbservice.access.authorize.RoleCache`); while that watch is not live, read
   from the registry for the connection, and cut off from it, as last watched.
5. The upstream connection: host aliases and TLS exactly as the health checks dial it,
   then :class:`~dbservice.engine.login.UpstreamLogin`.
6. ``+OK``, ``db.session.start``, and the proxy engine with :class:`AgentHooks` until
   either side closes; ``db.session.end`` (duration, commands, bytes each way) from
   ``finally``. MemoryDB in cluster mode gets the cluster engine
   (:mod:`dbservice.engine.cluster`: one plain server to the client, routed per shard), or, for
   a route naming a node (``db connect --node``), the proxy engine to that shard alone.
   A session logged in by IAM token runs its login's ``keep_alive`` beside the engine
   (a fresh ``AUTH`` every ``listener.iam_reauth``, injected between two client commands,
   or on every shard connection of a cluster session), cancelled when the session ends.

The agent's own certificate (the one the listener serves) bounds every session: when it
expires without a newer one in its place (revoked, the auth service unreachable),
:meth:`Listener.expire_sessions` ends the open sessions at that moment (logged, and
audited as ended for that reason) and new connections are closed before their TLS
handshake, with the reason logged and audited, until a valid certificate is in place.
The sessions are closed rather than sent an ``-ERR``: a line written into a session
could land inside a reply still on its way.

Connections the listener accepts but that never start a TLS handshake (port probes,
load-balancer checks) are only logged at debug level.

Steps 1 and 2 together must end within ``listener.handshake_timeout`` of the accept, and
connections in them are counted apart from the sessions (:class:`Handshakes`): at most
``listener.max_handshakes`` (when full, the oldest is closed to make room) and
``listener.max_handshakes_per_address`` from one address (more are closed at once).
``listener.max_connections`` counts the sessions past them. Connections refused or
closed for a limit are logged once per interval (:class:`RefusalLog`).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import errno
import ipaddress
import logging
import os
import socket
import ssl
import time
import uuid
import weakref
from collections import Counter
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, cast

from cryptography import x509

from bus import Bus, subjects
from bus.access import CACertificate, Identity, Role, get_roles
from bus.audit import SessionStart, ensure_audit_stream
from bus.errors import BusError
from bus.schemas import DatabaseResource
from dbservice.access.audit import AuditEmitter, QueryRedaction, SessionAudit
from dbservice.access.authorize import RoleCache, grant_for
from dbservice.access.ca import (
    CertificateRejected,
    ClientVerifier,
    check_signed_by,
    decode_identity,
    identity_from_ssl,
    load_certs,
    mtls_server_context,
)
from dbservice.access.spool import AuditSpool
from dbservice.engine.cluster.session import ClusterSession
from dbservice.engine.login import ClientCredentials, UpstreamLogin, UpstreamLoginError
from dbservice.engine.proxy import ProxyLimits, ProxySession, ProxyTimeouts, Streams, TcpConnector
from dbservice.engine.proxy.session import SessionStats
from dbservice.engine.proxy.settings import CommandBuffers
from dbservice.gateway.clusters import (
    ClusterEngines,
    LinkError,
    NodeNotFound,
    TopologyError,
    cluster_mode,
)
from dbservice.gateway.hooks import AgentHooks
from dbservice.gateway.metrics import AgentMetrics
from dbservice.gateway.offline import FleetLink
from dbservice.gateway.settings import ListenerConfig
from dbservice.managed.login import ManagedLogin
from dbservice.route import (
    EOF_COMMAND,
    ROUTE_OK,
    LoginRoute,
    Route,
    RouteError,
    encode_refusal,
    read_opening,
    route_from_server_name,
)
from dbservice.upstream.auth import REAUTH_RETRY
from dbservice.upstream.dial import TLSContexts, build_target
from dbservice.upstream.iam_login import IamLogin
from dbservice.upstream.tls import verify_failure
from fleetgate.addresses import join_host_port, split_host_port
from fleetgate.aio import cancel_and_wait, take_buffered
from fleetgate.backoff import backoff_delay
from fleetgate.config import ConfigError
from fleetgate.heap import HeapTrimmer
from fleetgate.logs import bind_context, log_context

logger = logging.getLogger(__name__)

NO_CHECK_TIME: Final = 0x200000
"""OpenSSL's ``X509_V_FLAG_NO_CHECK_TIME``: the agent checks the dates itself, after the
handshake, so it can tell an expired client why (see the module docstring)."""
SESSION_TICKETS: Final = 0
"""TLS 1.3 session tickets the listener sends per handshake (OpenSSL's default is 2). No
client of the agent resumes a session (``db connect``, redis-py, valkey-cli each start a
new one), and making a ticket encodes and encrypts the session with the client's
certificate in it: about a third of the server side of each handshake."""
NO_CA: Final = "this agent knows no fleet CA yet: run fleetgate auth init"
CA_RETRY: Final = (0.5, 1.0, 2.0, 5.0)
"""Seconds between looks for the CA bucket while it does not exist."""
CAPACITY_ERRORS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_PAUSE: Final = 0.1
REFUSAL_LOG_INTERVAL: Final = 10.0
"""Connections refused or closed for the limits are logged in one line per interval."""
READ_LIMIT: Final = 256 * 1024
STOP_GRACE: Final = 2.0
OWN_CHECK: Final = 60.0
"""At most this long between two looks at the agent's own certificate's expiry (a
renewal moves it; a clock step is caught up with)."""
OWN_RETRY: Final = 1.0
"""While the agent's own certificate is expired: how often sessions are looked for (and
the certificate file for a new one)."""
AUDIT_FLUSH: Final = 5.0
ROLES_READ: Final = 2.0
"""Longest wait for a fresh read of a session's roles before the watched ones are used."""
DEFAULT_OFFLINE_GRACE: Final = 900.0

Lookup = Callable[[str], DatabaseResource | None]


class Refused(Exception):
    """A connection is refused; the message goes to the client and the audit trail;
    ``kind`` is the bounded reason counted in the metrics (:data:`REFUSAL_REASONS`)."""

    def __init__(self, message: str, kind: str = "upstream") -> None:
        super().__init__(message)
        self.kind = kind


def address_key(host: str) -> str:
    """What ``listener.max_handshakes_per_address`` counts by: an IPv4 address (also
    when mapped into IPv6), or the /64 of an IPv6 address (what one host usually has)."""
    if ":" not in host:
        return host
    try:
        ip = ipaddress.IPv6Address(host.split("%", 1)[0])
    except ValueError:
        return host
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return f"{ipaddress.IPv6Address(int(ip) >> 64 << 64)}/64"


class Handshakes:
    """The connections still in their handshake (TLS, then the route), oldest first,
    and how many come from each address: ``listener.max_handshakes`` and
    ``listener.max_handshakes_per_address``, apart from ``listener.max_connections``."""

    def __init__(self, limit: int, per_address: int) -> None:
        self.limit = limit
        self.per_address = per_address
        self._open: dict[asyncio.Task[None], str] = {}
        """Each task still in its handshake, and its address key (in accept order)."""
        self._by_address: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._open)

    def address_full(self, key: str) -> bool:
        return self._by_address[key] >= self.per_address

    def add(self, task: asyncio.Task[None], key: str) -> asyncio.Task[None] | None:
        """Count ``task``; when that makes one too many, the oldest is no longer counted
        and returned (the caller closes it)."""
        self._open[task] = key
        self._by_address[key] += 1
        if len(self._open) <= self.limit:
            return None
        oldest = next(iter(self._open))
        self.discard(oldest)
        return oldest

    def discard(self, task: asyncio.Task[None] | None) -> None:
        """``task`` is out of its handshake (done, refused or closed); idempotent."""
        key = self._open.pop(task, None) if task is not None else None
        if key is not None:
            left = self._by_address[key] - 1
            if left:
                self._by_address[key] = left
            else:
                del self._by_address[key]


class RefusalLog:
    """Connections refused or closed for the listener's limits, logged as one line per
    :data:`REFUSAL_LOG_INTERVAL` (with counts per reason), not one per connection."""

    def __init__(self, interval: float = REFUSAL_LOG_INTERVAL) -> None:
        self.interval = interval
        self.counts: Counter[str] = Counter()
        """Since the last line: reason -> connections."""
        self.total = 0
        """Since the start."""
        self.lines = 0
        self._timer: asyncio.TimerHandle | None = None

    def note(self, reason: str) -> None:
        self.counts[reason] += 1
        self.total += 1
        if self._timer is None:
            # a line about many connections: not in the context of the one noted first
            self._timer = asyncio.get_running_loop().call_later(
                self.interval, self.flush, context=contextvars.Context()
            )

    def flush(self) -> None:
        self._timer = None
        if not self.counts:
            return
        shown = sorted(self.counts.items(), key=lambda item: -item[1])
        parts = [f"{count} {reason}" for reason, count in shown[:5]]
        if len(shown) > 5:
            parts.append(f"{sum(count for _, count in shown[5:])} for other reasons")
        logger.warning(
            "%d client connections refused or closed in the last %gs: %s",
            sum(self.counts.values()),
            self.interval,
            "; ".join(parts),
        )
        self.lines += 1
        self.counts.clear()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.flush()


class FleetTrust:
    """The fleet CA from the registry, and the server TLS context built on it and on the
    listener's certificate files (re-read when they change on disk, so a renewed
    certificate applies to the next connection)."""

    def __init__(self, config: ListenerConfig) -> None:
        self.config = config
        self.certs: list[x509.Certificate] = []
        self.verifier = ClientVerifier(())
        """Checks client certificates against :attr:`certs`; a new one with each CA, so
        nothing accepted under a previous CA carries over."""
        self.context: ssl.SSLContext | None = None
        self.fingerprint = ""
        self.known = asyncio.Event()
        """Set once the registry was read (with or without a CA in it)."""
        self.own_expires: datetime | None = None
        """When the certificate the listener serves expires (as last loaded)."""
        self._record: CACertificate | None = None
        self._stamp = self._files_stamp()
        self._server_names: weakref.WeakKeyDictionary[ssl.SSLObject, str] = (
            weakref.WeakKeyDictionary()
        )

    def _remember_server_name(
        self, ssl_object: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext
    ) -> None:
        """The contexts' ``sni_callback``: keep the name for :meth:`server_name`."""
        if server_name:
            self._server_names[ssl_object] = server_name

    def server_name(self, ssl_object: ssl.SSLObject | None) -> str | None:
        """The TLS server name (SNI) the client of ``ssl_object`` sent, if any."""
        return self._server_names.pop(ssl_object, None) if ssl_object is not None else None

    def _files_stamp(self) -> tuple[tuple[int, int, int], ...] | None:
        try:
            stats = [p.stat() for p in (self.config.cert_file, self.config.key_file)]
        except OSError:
            return None
        return tuple((s.st_ino, s.st_size, s.st_mtime_ns) for s in stats)

    def refresh(self) -> None:
        """Rebuild the context when the certificate files changed (two ``stat`` calls)."""
        if self.known.is_set() and self._files_stamp() != self._stamp:
            logger.info("%s changed: loading it", self.config.cert_file)
            self.update(self._record)

    def update(self, record: CACertificate | None) -> None:
        """Use ``record`` (None: no CA yet). Never raises: a context that cannot be built
        is logged and the previous one kept."""
        self._record, self._stamp = record, self._files_stamp()
        try:
            certs, context = self._build(record)
        except (CertificateRejected, ssl.SSLError, OSError, ValueError) as exc:
            logger.error("cannot set up the listener's TLS (%s); keeping the previous setup", exc)
            self.known.set()
            return
        if record is None:
            logger.warning(
                "no fleet CA in the registry: clients are refused until fleetgate auth init"
            )
        elif self.fingerprint != record.fingerprint:
            log = logger.info if self.fingerprint else logger.debug
            log("trusting the fleet CA %s for client certificates", record.fingerprint)
        if certs != self.certs:
            self.verifier = ClientVerifier(certs)
        self.certs, self.context = certs, context
        self.fingerprint = record.fingerprint if record is not None else ""
        self.known.set()

    def own_expired(self, now: datetime | None = None) -> str | None:
        """Why the listener may not serve (its own certificate expired), or None."""
        expires = self.own_expires
        if expires is None or expires > (now or datetime.now(UTC)):
            return None
        return (
            f"the agent's own certificate ({self.config.cert_file}) expired at "
            f"{expires:%Y-%m-%d %H:%M:%SZ} and was not renewed"
        )

    def _build(self, record: CACertificate | None) -> tuple[list[x509.Certificate], ssl.SSLContext]:
        files = (self.config.cert_file, self.config.key_file)
        own = x509.load_pem_x509_certificate(self.config.cert_file.read_bytes())
        self.own_expires = own.not_valid_after_utc
        if record is None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.load_cert_chain(*map(str, files))
            context.sni_callback = self._remember_server_name
            context.num_tickets = SESSION_TICKETS
            return [], context
        certs = load_certs(record.pem)
        context = mtls_server_context(record.pem, *files)
        context.sni_callback = self._remember_server_name
        context.verify_mode = ssl.CERT_OPTIONAL
        context.verify_flags |= NO_CHECK_TIME
        context.num_tickets = SESSION_TICKETS
        if not any(check_signed_by(own, ca) for ca in certs):
            logger.warning(
                "%s was not issued by the fleet CA %s: clients will not trust this agent "
                "(issue one with fleetgate auth sign --host NAME)",
                self.config.cert_file,
                record.fingerprint,
            )
        return certs, context

    async def follow(self, bus: Bus) -> None:
        """Keep :attr:`context` in step with the CA record, forever. Until ``auth init``
        created the bucket, clients are refused with a reason and the bucket is looked
        for again every few seconds."""
        attempt = 0
        while True:
            try:
                await bus.bucket(subjects.AUTH_BUCKET, create=False)
                break
            except BusError as exc:
                if not self.known.is_set():
                    self.update(None)
                    logger.warning("cannot read the fleet CA: %s", exc)
                await asyncio.sleep(backoff_delay(CA_RETRY, attempt))
                attempt += 1
        seen = False
        # aclosing: the watch (and the NATS consumer under it) stops when this task is
        # cancelled, not whenever the generator is collected.
        watch = bus.watch(subjects.AUTH_BUCKET, CACertificate, keys=subjects.CA_KEY, create=False)
        async with contextlib.aclosing(watch) as events:
            async for event in events:
                if event.kind == "upsert" and event.value is not None:
                    seen = True
                    self.update(event.value)
                elif event.kind == "deleted":
                    seen = False
                    self.update(None)
                elif event.kind == "synced" and not seen and not self.known.is_set():
                    self.update(None)


class Listener:
    """Accepts clients on ``listen_addr``: :meth:`start` binds, :meth:`accept` (a root
    task of the agent, with ``trust.follow`` and :meth:`check_audit_stream`) accepts
    until cancelled, one task per connection, and :meth:`aclose` ends the sessions."""

    def __init__(
        self,
        *,
        hostname: str,
        listen_addr: str,
        config: ListenerConfig,
        bus: Bus,
        host_id: str,
        lookup: Lookup,
        contexts: TLSContexts,
        login: Callable[[DatabaseResource], UpstreamLogin] = lambda _: ClientCredentials(),
        host_aliases: Mapping[str, str] | None = None,
        upstream_ca_file: Path | None = None,
        offline_grace: float = DEFAULT_OFFLINE_GRACE,
        audit_spool: AuditSpool | None = None,
        metrics: AgentMetrics | None = None,
    ) -> None:
        self.hostname = hostname
        self.metrics = metrics if metrics is not None else AgentMetrics()
        self.listen_addr = listen_addr
        self.host_aliases: Mapping[str, str] = dict(host_aliases or {})
        self.upstream_ca_file = upstream_ca_file
        self.config = config
        self.bus = bus
        self.host_id = host_id
        self.lookup = lookup
        self.contexts = contexts
        self.login = login
        self.trust = FleetTrust(config)
        self.roles = RoleCache(bus)
        """Every role, kept current by a watch (:meth:`RoleCache.follow`, a root task);
        as last delivered while cut off."""
        self.redaction = QueryRedaction(
            max_arg_len=config.audit.max_arg_len,
            max_args=config.audit.max_args,
            redact_values=config.audit.redact_values,
        )
        self.timeouts = ProxyTimeouts(idle=config.idle_timeout, link_idle=config.shard_idle_timeout)
        self.limits = ProxyLimits(max_command_buffer=config.max_command_buffer)
        self.buffers = CommandBuffers(config.max_command_buffer_total)
        """Bytes the sessions hold of commands still arriving, all together."""
        self.clusters = ClusterEngines(
            aliases=self.host_aliases, contexts=contexts, connect_timeout=config.connect_timeout
        )
        """The cluster engine's per-database state (MemoryDB in cluster mode)."""
        self.audit = AuditEmitter.for_bus(bus, host_id=host_id, spool=audit_spool)
        self.link = FleetLink(bus, grace=offline_grace)
        """Whether the agent reaches the fleet's JetStream (:meth:`FleetLink.follow`)."""
        self.sessions: set[asyncio.Task[None]] = set()
        self.heap = HeapTrimmer.for_this_process()
        """Gives closed sessions' memory back to the system (glibc only)."""
        self.port = 0
        self.refusals = 0
        self.handshakes = Handshakes(config.max_handshakes, config.max_handshakes_per_address)
        """Connections not yet authenticated (``listener.max_handshakes``)."""
        self.established = 0
        """Sessions past their handshake (``listener.max_connections``)."""
        self.limited = RefusalLog()
        """Connections refused or closed for a limit, logged once per interval."""
        self.ended_for: str | None = None
        """Why the open sessions are being ended (the agent's certificate expired)."""
        self._sock: socket.socket | None = None

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self, *, reuse_port: bool = False) -> None:
        """Bind (ConfigError when the address cannot be used; clients wait in the
        backlog until :meth:`accept` runs) and start the audit emitter; ``reuse_port``:
        share the address with the agent's other listener processes."""
        host, port = split_host_port(self.listen_addr)
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
            family = infos[0][0]
            sock = socket.create_server(
                (host, port), family=family, backlog=1024, reuse_port=reuse_port
            )
        except OSError as exc:
            raise ConfigError(
                f"db_service.listen_addr {self.listen_addr}: cannot listen ({os_reason(exc)})"
            ) from None
        sock.setblocking(False)
        self._sock = sock
        self.port = int(sock.getsockname()[1])
        self.audit.start()
        logger.info(
            "accepting clients on %s (mutual TLS with the fleet CA)",
            join_host_port(host, self.port),
        )

    async def aclose(self) -> None:
        """After :meth:`accept` has stopped: close the socket, end every session (its
        end event is still emitted) and wait for each, then flush the audit events."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        await self._end_sessions()
        await self.heap.aclose()
        self.limited.close()
        await self.audit.aclose(flush_timeout=AUDIT_FLUSH)

    async def _end_sessions(self) -> None:
        """Cancel every session (their own way to end: the ``finally`` emits the end
        event and closes both sides), give them :data:`STOP_GRACE`, cancel again what is
        left, and wait until every one has ended."""
        late = set(self.sessions)
        for task in late:
            task.cancel()
        while late:
            _, late = await asyncio.wait(late, timeout=STOP_GRACE)
            if late:
                logger.warning(
                    "%d client sessions did not end within %gs of the stop; cancelling them again",
                    len(late),
                    STOP_GRACE,
                )
                for task in late:
                    task.cancel()

    async def expire_sessions(self) -> None:
        """Forever (a root task): at the expiry of the agent's own certificate, unless a
        newer one is in place by then, end every open session (see the module
        docstring); then wait for a valid certificate."""
        await self.trust.known.wait()
        while True:
            self.trust.refresh()
            expires = self.trust.own_expires
            now = datetime.now(UTC)
            if expires is None or expires > now:
                left = (expires - now).total_seconds() if expires is not None else OWN_CHECK
                await asyncio.sleep(min(max(left, 0.01), OWN_CHECK))
                continue
            reason = self.trust.own_expired(now)
            if reason is not None and self.sessions:
                logger.error(
                    "%s: ending the %d open client sessions; new connections are refused "
                    "until the agent has a valid certificate",
                    reason,
                    len(self.sessions),
                )
                self.ended_for = reason
                try:
                    await self._end_sessions()
                finally:
                    self.ended_for = None
            await asyncio.sleep(OWN_RETRY)

    async def check_audit_stream(self) -> None:
        """Create the audit stream when it is missing; its retention is the auth
        service's (or an admin's) to set."""
        try:
            await ensure_audit_stream(self.bus, update=False)
        except BusError as exc:
            logger.warning("cannot check the audit stream (%s); events wait until it exists", exc)

    async def accept(self) -> None:
        """Accept clients until cancelled (one task per connection, in :attr:`sessions`);
        raises when accepting fails for anything but running out of resources."""
        if self._sock is None:
            raise RuntimeError("Listener.accept before start")
        await self._accept_loop(self._sock)

    async def _accept_loop(self, listening: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, address = await loop.sock_accept(listening)
            except OSError as exc:
                if exc.errno not in CAPACITY_ERRORS:
                    raise
                logger.warning("cannot accept clients (%s); pausing", exc.strerror)
                await asyncio.sleep(ACCEPT_PAUSE)
                continue
            key = address_key(str(address[0]))
            if self.handshakes.address_full(key):
                self.limited.note(
                    f"from {key} over listener.max_handshakes_per_address "
                    f"({self.handshakes.per_address} in their handshake)"
                )
                sock.close()
                continue
            # the session's log context, also for the line that reports its failure
            context = contextvars.copy_context()
            task = asyncio.create_task(
                self._serve(sock, address), name="client-session", context=context
            )
            self.sessions.add(task)
            task.add_done_callback(self._session_done, context=context)
            oldest = self.handshakes.add(task, key)
            if oldest is not None:
                self.limited.note(
                    f"closed in their handshake to make room (listener.max_handshakes "
                    f"{self.handshakes.limit})"
                )
                oldest.cancel()

    def _session_done(self, task: asyncio.Task[None]) -> None:
        self.sessions.discard(task)
        self.handshakes.discard(task)
        self.heap.closed()
        if not task.cancelled() and (error := task.exception()) is not None:
            logger.error("a client session failed", exc_info=error)

    # -- one connection ------------------------------------------------------------------

    async def _serve(self, sock: socket.socket, address: tuple[str, int] | tuple[str, ...]) -> None:
        client_addr = join_host_port(str(address[0]), int(address[1]))
        # the connection's id from its first byte: its session's audit events (or its
        # refusal's) and every log line made while serving it (in this task, its children
        # and its transports' callbacks) carry it
        bind_context(client_addr=client_addr, session_id=uuid.uuid4().hex)
        deadline = asyncio.get_running_loop().time() + self.config.handshake_timeout
        try:
            streams = await self._handshake(sock, client_addr, deadline)
        except BaseException:
            sock.close()
            raise
        if streams is None:
            sock.close()
            return
        writer = streams[1]
        try:
            known = await self._authenticate(streams, client_addr, deadline)
            self.handshakes.discard(asyncio.current_task())
            if known is None:
                return
            bind_context(user=known[0].user, database=known[1].database)
            if self.established >= self.config.max_connections:
                reason = (
                    f"agent {self.hostname} has {self.established} sessions open, "
                    f"its limit (listener.max_connections); try again later"
                )
                self.limited.note("over listener.max_connections")
                identity, route, _ = known
                self._refused_start(
                    client_addr,
                    reason,
                    user=identity.user,
                    roles=identity.roles,
                    principal=identity.aws_arn,
                    database=route.database,
                    db_user=route.db_user,
                    log=False,
                    kind="limit",
                )
                await _refuse(writer, reason)
                return
            self.established += 1
            try:
                await self._session(streams, client_addr, *known)
            finally:
                self.established -= 1
        finally:
            writer.transport.abort()

    async def _handshake(
        self, sock: socket.socket, client_addr: str, deadline: float
    ) -> Streams | None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=READ_LIMIT)
        protocol = asyncio.StreamReaderProtocol(reader)
        try:
            async with asyncio.timeout_at(deadline):
                await self.trust.known.wait()
                # the listener's certificate is not this connection's affair
                contextvars.Context().run(self.trust.refresh)
                expired = self.trust.own_expired()
                if expired is not None:
                    self.limited.note("closed before TLS: the agent's own certificate expired")
                    self._refused_start(
                        client_addr, expired, log=False, kind="own_certificate_expired"
                    )
                    return None
                context = self.trust.context
                if context is None:
                    logger.warning(
                        "%s: closed, the listener's TLS is not set up (see above)", client_addr
                    )
                    return None
                transport, _ = await loop.connect_accepted_socket(
                    lambda: protocol,
                    sock,
                    ssl=context,
                    ssl_handshake_timeout=max(deadline - loop.time(), 0.001),
                )
        except ssl.SSLError as exc:
            self._refused_start(
                client_addr, f"TLS handshake failed: {tls_reason(exc)}", kind="tls_handshake"
            )
            return None
        except TimeoutError:
            self.limited.note("closed with no TLS handshake within listener.handshake_timeout")
            logger.debug("%s: no TLS handshake within the handshake timeout", client_addr)
            return None
        except (OSError, EOFError) as exc:
            logger.debug("%s: no TLS handshake (%r)", client_addr, exc)
            return None
        return reader, asyncio.StreamWriter(transport, protocol, reader, loop)

    async def _authenticate(
        self, streams: Streams, client_addr: str, deadline: float
    ) -> tuple[Identity, Route, bytes | None] | None:
        """The client's certificate, then its route (the server name, else the client's
        first command by ``deadline``) and what the session starts with: None for the
        preamble (answered ``+OK``), empty for the server name, else the first command
        (an AUTH/HELLO naming the route); None when refused (the client was told why)."""
        reader, writer = streams
        ssl_object = writer.get_extra_info("ssl_object")
        try:
            identity = identity_from_ssl(ssl_object, self.trust.verifier)
        except CertificateRejected as exc:
            reason = str(exc) if self.trust.certs else NO_CA
            self._refused_start(
                client_addr, reason, user=self._claimed_user(ssl_object), kind="certificate"
            )
            await _refuse(writer, reason)
            return None
        try:
            route: Route | None = route_from_server_name(self.trust.server_name(ssl_object))
            first: bytes | None = b""
            if route is None:
                async with asyncio.timeout_at(deadline):
                    opening = await read_opening(reader)
                if isinstance(opening, LoginRoute):
                    route, first = opening.route, opening.command
                else:
                    route, first = opening, None
        except (TimeoutError, RouteError) as exc:
            if isinstance(exc, TimeoutError):
                limit = self.config.handshake_timeout
                reason = (
                    f"no route within {limit:g}s (listener.handshake_timeout): send the "
                    "route preamble or AUTH <db_user>@<database> <password> first"
                )
            else:
                reason = str(exc)
            self._refused_start(
                client_addr, reason, user=identity.user, roles=identity.roles,
                principal=identity.aws_arn, kind="route",
            )  # fmt: skip
            await _refuse(writer, reason)
            return None
        return identity, route, first

    async def _session(
        self,
        streams: Streams,
        client_addr: str,
        identity: Identity,
        route: Route,
        first: bytes | None,
    ) -> None:
        writer = streams[1]
        limit = self.config.handshake_timeout
        database, db_user = route.database, route.db_user
        try:
            node = route.node
            offline = self.link.refusal()
            if offline is not None:
                raise Refused(offline, "offline")
            if self.audit.spool is not None and self.audit.full():
                raise Refused(self.audit.full_reason(), "audit_full")
            resource = self.lookup(database)
            if resource is None:
                raise Refused(
                    f"agent {self.hostname} does not serve database {database!r}",
                    "unknown_database",
                )
            roles = await self._roles(identity, min(limit, ROLES_READ))
            grant = grant_for(
                identity,
                roles,
                database=database,
                labels=resource.metadata.labels,
                db_user=db_user,
            )
            if not grant.allowed:
                raise Refused(grant.decision.reason, "access_denied")
        except Refused as exc:
            self._refused_start(
                client_addr,
                str(exc),
                user=identity.user,
                roles=identity.roles,
                principal=identity.aws_arn,
                database=database,
                db_user=db_user,
                kind=exc.kind,
            )
            await _refuse(writer, str(exc))
            return
        audit = self.audit.session(
            identity,
            database=database,
            db_user=db_user,
            client_addr=client_addr,
            redaction=self.redaction,
            session_id=log_context().get("session_id"),
        )
        connected = await self._upstream(resource, db_user, audit, writer, node=node)
        if connected is None:
            return
        upstream, ready, login = connected
        hooks = AgentHooks(
            grant=grant, audit=audit, db_user=db_user, login=login, authenticated=ready
        )
        if first is None:
            writer.write(ROUTE_OK)
        elif first:
            # no await from here to the engine taking the connection over
            streams = with_first_command(streams, first)
        audit.start(reason=grant.decision.reason)
        self.metrics.sessions_opened.labels(database).inc()
        logger.debug(
            "session %s: %s to %s as %s", audit.session_id, identity.user, database, db_user
        )
        session: ProxySession | ClusterSession
        eof_command = EOF_COMMAND.decode() if route.half_close else None
        if cluster_mode(resource) and not node:
            session = self.clusters.session(
                streams, upstream, resource=resource, login=login, db_user=db_user,
                hooks=hooks, timeouts=self.timeouts, client_port=route.port,
                eof_command=eof_command, limits=self.limits, buffers=self.buffers,
                on_link_closed=self.heap.closed,
            )  # fmt: skip
        else:
            session = ProxySession(
                streams, upstream, hooks=hooks, limits=self.limits, timeouts=self.timeouts,
                inspect=("*",), eof_command=eof_command,
            )  # fmt: skip
        # the session owns the upstream connection now: a reference kept here would keep
        # its TLS state (about 40 KiB) alive after the cluster engine closes it unused
        del connected, upstream
        renewal = self._keep_alive(login, session)
        try:
            await session.run()
        finally:
            if renewal is not None:
                await _stop_renewal(renewal, audit.session_id)
            stats = session.stats
            audit.add_bytes(to_db=stats.bytes_from_client, to_client=stats.bytes_to_client)
            reason = stats.reason or "stopped"
            if reason == "stopped" and self.ended_for is not None:
                reason = self.ended_for
            audit.end(reason=reason)
            self._count(database, stats, hooks)

    async def _roles(self, identity: Identity, wait: float) -> list[Role]:
        """The roles named in the certificate: from the roles watch while it is live (no
        NATS message); else read fresh while the agent reaches the fleet; else as last
        watched (within ``offline_grace``, checked before)."""
        live = self.roles.roles(identity.roles)
        if live is not None:
            return live
        if self.link.cut_for() == 0.0:
            try:
                async with asyncio.timeout(wait):
                    roles = await get_roles(self.bus, identity.roles)
            except (BusError, TimeoutError) as exc:
                self.link.lost(f"cannot read roles: {str(exc) or 'no answer'}")
            else:
                self.link.contact()
                return roles
        last = self.roles.last_known(identity.roles)
        if last is None:
            raise Refused(
                "cannot read your roles from the registry now, and this agent has not read "
                "them since it started; try again",
                "roles_unavailable",
            )
        return last

    def _keep_alive(
        self, login: UpstreamLogin, session: ProxySession | ClusterSession
    ) -> asyncio.Task[None] | None:
        """The login's re-authentication loop (IAM logins have one) as a task."""
        keep_alive = getattr(login, "keep_alive", None)
        if keep_alive is None:
            return None
        every = self.config.iam_reauth
        renew = keep_alive(session, every=every, retry=min(every, REAUTH_RETRY))
        if renew is None:
            return None
        return asyncio.create_task(renew, name="iam-reauth")

    async def _upstream(
        self,
        resource: DatabaseResource,
        db_user: str,
        audit: SessionAudit,
        writer: asyncio.StreamWriter,
        *,
        node: str = "",
    ) -> tuple[Streams, bool, UpstreamLogin] | None:
        login = self.login(resource)
        up: Streams | None = None
        began = time.monotonic()
        failure = "other"
        try:
            try:
                target = build_target(resource, aliases=self.host_aliases, contexts=self.contexts)
                connector = TcpConnector(
                    target.host,
                    target.port,
                    ssl=target.tls,
                    server_hostname=target.server_name,
                    connect_timeout=self.config.connect_timeout,
                )
                up = await connector.connect()
                async with asyncio.timeout(self.config.connect_timeout):
                    ready = await login.login(up, db_user=db_user)
                    if node:
                        up, ready = await self._to_node(resource, up, login, db_user, node)
            except TimeoutError:
                failure = "timeout"
                raise Refused(
                    f"cannot reach {resource.name}: no answer within "
                    f"{self.config.connect_timeout:g}s"
                ) from None
            except ssl.SSLError as exc:
                failure = "tls"
                tls = resource.spec.tls
                logger.warning(
                    "%s",
                    verify_failure(
                        exc,
                        database=resource.name,
                        mode=tls.mode,
                        ca_pem=tls.ca_cert,
                        ca_file=self.upstream_ca_file,
                    ),
                )
                raise Refused(f"cannot reach {resource.name}: TLS: {tls_reason(exc)}") from None
            except (OSError, ValueError, UpstreamLoginError) as exc:
                failure = (
                    login_kind(login, db_user) if isinstance(exc, UpstreamLoginError) else "connect"
                )
                raise Refused(f"cannot reach {resource.name}: {os_reason(exc)}") from None
        except Refused as exc:
            if up is not None:
                up[1].transport.abort()
            self.refusals += 1
            self.metrics.sessions_refused.labels("upstream").inc()
            self.metrics.upstream_failures.labels(failure).inc()
            logger.info("session %s refused: %s", audit.session_id, exc)
            audit.start(success=False, reason=str(exc))
            await _refuse(writer, str(exc))
            return None
        self.metrics.upstream_connect.observe(time.monotonic() - began)
        return up, ready, login

    async def _to_node(
        self,
        resource: DatabaseResource,
        seed: Streams,
        login: UpstreamLogin,
        db_user: str,
        node: str,
    ) -> tuple[Streams, bool]:
        """``fleetgate db connect --node``: the shard's primary instead of the cluster."""
        if not cluster_mode(resource):
            raise Refused(f"{resource.name} is not in cluster mode: --node applies to clusters")
        try:
            return await self.clusters.node_upstream(
                seed, resource=resource, login=login, db_user=db_user, node=node
            )
        except NodeNotFound as exc:
            raise Refused(str(exc)) from None
        except (LinkError, TopologyError) as exc:
            raise Refused(f"cannot reach {resource.name}: {exc}") from None

    def _count(self, database: str, stats: SessionStats, hooks: AgentHooks) -> None:
        """A session's commands and bytes, once, when it ends (nothing per command)."""
        m = self.metrics
        refused = max(stats.refused, hooks.refused)
        m.commands_forwarded.labels(database).inc(max(stats.commands - refused, 0))
        if refused:
            m.commands_refused.labels(database).inc(refused)
        m.bytes.labels("to_db").inc(stats.bytes_from_client)
        m.bytes.labels("to_client").inc(stats.bytes_to_client)
        m.session_duration.observe(stats.duration or time.time() - stats.started)

    # -- refusals --------------------------------------------------------------------------

    def _refused_start(
        self,
        client_addr: str,
        reason: str,
        *,
        user: str = "",
        roles: tuple[str, ...] = (),
        database: str = "",
        db_user: str = "",
        principal: str = "",
        log: bool = True,
        kind: str,
    ) -> None:
        self.refusals += 1
        self.metrics.sessions_refused.labels(kind).inc()
        if log:
            logger.info("client %s%s refused: %s", user + "@" if user else "", client_addr, reason)
        self.audit.emit(
            SessionStart(
                user=user,
                roles=roles,
                database=database,
                db_user=db_user,
                client_addr=client_addr,
                host_id=self.host_id,
                success=False,
                reason=reason,
                principal=principal,
                session_id=log_context().get("session_id", ""),
            )
        )

    def _claimed_user(self, ssl_object: ssl.SSLObject | None) -> str:
        """The user of a rejected certificate, when our CA issued it (expired ones)."""
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if not der:
            return ""
        try:
            cert = x509.load_der_x509_certificate(der)
            if any(check_signed_by(cert, ca) for ca in self.trust.certs):
                return decode_identity(cert).user
        except (ValueError, CertificateRejected):
            pass
        return ""


async def _stop_renewal(task: asyncio.Task[None], session_id: str) -> None:
    """Cancel the session's re-authentication loop and wait until it has ended, also
    when the session is cancelled again meanwhile (that cancellation is raised after)."""
    if (error := await cancel_and_wait(task)) is not None:
        logger.error(
            "session %s: the IAM re-authentication loop failed", session_id, exc_info=error
        )


def login_kind(login: UpstreamLogin, db_user: str) -> str:
    """The ``kind`` of a failed upstream login as ``db_user``: ``iam``,
    ``managed_password`` or ``other`` (the client's own credentials)."""
    if isinstance(login, ManagedLogin):
        if login.managed or login.service.managed(login.resource, db_user) is not None:
            return "managed_password"
        return login_kind(login.inner, db_user)
    if isinstance(login, IamLogin):
        return "iam"
    return "other"


def with_first_command(streams: Streams, command: bytes) -> Streams:
    """The client's streams with ``command`` ahead of what it sent after its first
    command (read from here on, nothing read twice nor lost): a new reader fed by the
    same transport, for the engine to take over at once (no await in between)."""
    reader, writer = streams
    transport = cast(asyncio.Transport, writer.transport)  # it reads too
    loop = asyncio.get_running_loop()
    fresh = asyncio.StreamReader(limit=READ_LIMIT, loop=loop)
    protocol = asyncio.StreamReaderProtocol(fresh, loop=loop)
    fresh.feed_data(command + take_buffered(reader))
    if reader.at_eof() or reader.exception() is not None or transport.is_closing():
        fresh.feed_eof()
    else:
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        # the old reader may have paused reading with its buffer full; this one reads on
        transport.resume_reading()
    return fresh, asyncio.StreamWriter(transport, protocol, fresh, loop)


async def _refuse(writer: asyncio.StreamWriter, reason: str) -> None:
    """Send ``-ERR <reason>`` and close (briefly waiting for it to leave)."""
    writer.write(encode_refusal(reason))
    with contextlib.suppress(OSError, TimeoutError):
        async with asyncio.timeout(1.0):
            await writer.drain()
            writer.close()
            await writer.wait_closed()


def tls_reason(exc: ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate not trusted: {exc.verify_message}"
    return str(exc.reason or exc)


def os_reason(exc: BaseException) -> str:
    """``Connection refused`` rather than asyncio's ``Connect call failed (...)``."""
    number = getattr(exc, "errno", None)
    if isinstance(number, int) and number > 0:
        return os.strerror(number)
    return str(exc) or type(exc).__name__
