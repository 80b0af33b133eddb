"""The agent process: one bus connection, the registry watch, one supervisor of
per-database workers, and a graceful stop on SIGTERM/SIGINT.

Its long-running loops are named root tasks of one
:class:`~fleetgate.supervise.RootTasks` (registry-watch, managed-users, cert-renewal,
client-listener, fleet-ca-watch, roles-watch, fleet-link, own-cert-expiry,
audit-stream, and in a listener process leader): the stop event or any root failing or
ending cancels them all, and the process then ends, in order and waiting for each, what
they leave behind: the managed-user service, the client sessions and audit events
(:meth:`Listener.aclose`), the per-database workers and their heartbeats
(:meth:`Supervisor.stop_all`), and the listener processes. A root failure is logged with
its name and the agent exits 1.

With ``listener.processes`` above 1 this process is the *leader*: it does all of the
above and starts the listener processes (:mod:`dbservice.agent.processes`), which run
:class:`Agent` in listener-only mode (``listener_process`` set)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Sequence

from prometheus_client.core import Metric

from bus import BUCKETS, BucketSpec, Bus, DatabaseResource, leases, subjects
from bus.client import when_jetstream_answers
from bus.errors import BusError
from bus.settings import NatsConnection
from dbservice.agent.config import AgentConfig
from dbservice.agent.health import Prober, TLSContexts, probe
from dbservice.agent.heartbeat import AgentIdentity, Announcer
from dbservice.agent.identity import DataDir
from dbservice.agent.join import Renewer, ensure_identity, with_nats_login
from dbservice.agent.managed_users import build_service
from dbservice.agent.processes import (
    ListenerProcess,
    ListenerProcesses,
    check_address_free,
    die_with_leader,
    follow_leader,
)
from dbservice.agent.served import Selection, follow_registry, static_resource
from dbservice.agent.supervisor import Supervisor
from dbservice.agent.worker import DatabaseWorker, PassiveWorker, Worker
from dbservice.gateway.audit_spool import open_spool
from dbservice.gateway.listener import Listener
from dbservice.gateway.metrics import (
    AgentMetrics,
    counter,
    gauge,
    labelled_counter,
    labelled_gauge,
)
from dbservice.managed.login import ManagedLogins
from dbservice.managed.membership import AclMembership
from dbservice.managed.service import ManagedUsers
from dbservice.upstream.iam import IamAuth
from dbservice.upstream.iam_login import IamLogins
from fleetgate import __version__
from fleetgate.addresses import join_host_port, split_host_port
from fleetgate.aio import stop_on_signals
from fleetgate.config import ConfigError
from fleetgate.durations import format_duration
from fleetgate.logs import log_format
from fleetgate.metrics import Check, DiagServer
from fleetgate.supervise import RootTasks

logger = logging.getLogger(__name__)

CLOSE_TIMEOUT = 3.0
PROBE_CONCURRENCY = 64
"""Health probes in flight at once over all databases (each holds a socket)."""
EXPECTED = (BusError, OSError, ConfigError)
"""Errors a root task may stop the agent with that are logged without a traceback."""


class Agent:
    """One agent. :meth:`run` serves until ``stop`` is set; ``supervisor`` and
    ``synced`` are there for whoever embeds it (tests, the sandbox)."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        nats_url: str | NatsConnection,
        prober: Prober = probe,
        acl_membership: AclMembership | None = None,
        listener_process: ListenerProcess | None = None,
        process_argv: Sequence[str] | None = None,
    ) -> None:
        self.config = config
        self.listener_process = listener_process
        """Set in a listener process: serve clients only (no health checks, heartbeats,
        rotation or cleanup); None in the agent process itself."""
        self.process_argv = list(process_argv or default_argv())
        """How the leader starts a listener process (``--listener-process K`` added)."""
        self.processes: ListenerProcesses | None = None
        """The leader's listener processes (None unless ``listener.processes`` > 1)."""
        self.acl_membership = acl_membership
        """How managed users' ACL membership is read (default: from the config)."""
        self.managed: ManagedUsers | None = None
        """The managed-user service (None when ``managed_users.enabled`` is false)."""
        self.settings = config.db_service
        self.nats = NatsConnection.from_url(nats_url) if isinstance(nats_url, str) else nats_url
        """How to reach NATS (files read, secrets held; never logged whole)."""
        self.prober = prober
        self.synced = asyncio.Event()
        """Set once the first registry snapshot has been reconciled."""
        self.supervisor: Supervisor | None = None
        self.identity: AgentIdentity | None = None
        self.bus: Bus | None = None
        self.listener: Listener | None = None
        """The client listener (None without ``db_service.listener``)."""
        self.renewer: Renewer | None = None
        """Renews the agent's own certificate (with ``db_service.join``)."""
        self.metrics = AgentMetrics()
        """This process's metrics (its own registry), served on ``db_service.diag_addr``."""
        self.diag: DiagServer | None = None
        self.iam: IamAuth | None = None
        self.watched: set[str] = set()
        """Keys of the registry entries the watch has seen (served or not)."""
        """Signs IAM tokens and keeps AWS calls counted (read by the metrics)."""

    async def run(self, stop: asyncio.Event) -> int:
        """0 after a graceful stop, 1 when the registry watch failed."""
        began = time.monotonic()
        child = self.listener_process
        data_dir: DataDir | None = None
        if child is None:
            data_dir = DataDir.open(self.settings.data_dir)
            host_id = data_dir.host_id
            if self.settings.join is not None:
                try:
                    cert = await ensure_identity(self.settings, host_id)
                except BaseException:
                    data_dir.close()
                    raise
                self.renewer = Renewer(self.settings, host_id, cert)
        else:  # a listener process: its leader's host_id; data_dir stays the leader's
            host_id = child.host_id
        if self.settings.join is not None:  # its own NATS user, when join gave it one
            try:
                self.nats = with_nats_login(self.nats, self.settings.data_dir)
            except BaseException:
                if data_dir is not None:
                    data_dir.close()
                raise
        try:
            await self._start_diag(child)  # answers /readyz 503 while NATS is not reached
            bus = await Bus.connect(
                self.nats,
                name=f"fleetgate-agent {self.settings.hostname}"
                + (f" listener {child.index}" if child is not None else ""),
                reconnect_wait=0.5,
                wait=self.config.nats.start_wait,
            )
            self.bus = bus
            if self.config.jetstream is not None:
                bus.replication = self.config.jetstream.replication()
            try:
                if child is None:
                    await when_jetstream_answers(
                        lambda: bus.provision(*self._buckets()),
                        wait=self.config.nats.start_wait,
                        what="setting up the agent's buckets",
                    )
                self.identity = AgentIdentity(
                    host_id=host_id,
                    hostname=self.settings.hostname,
                    version=__version__,
                    addr=self.settings.advertise(),
                )
                return await self._serve(bus, self.identity, stop, began)
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(bus.close(), CLOSE_TIMEOUT)
        finally:
            if self.diag is not None:
                await self.diag.aclose()
                self.diag = None
            if data_dir is not None:
                data_dir.close()

    async def _serve(
        self, bus: Bus, identity: AgentIdentity, stop: asyncio.Event, began: float
    ) -> int:
        settings = self.settings
        child = self.listener_process
        announcer = (
            Announcer(bus=bus, identity=identity, ttl=settings.heartbeat.ttl)
            if child is None
            else None
        )
        renewer = self.renewer
        if announcer is not None and renewer is not None:
            announcer.cert_status = lambda: (renewer.status.expires, renewer.status.error)
        contexts = TLSContexts(extra_ca_file=settings.upstream_ca_file)
        probe_slots = asyncio.Semaphore(PROBE_CONCURRENCY)

        def make_worker(resource: DatabaseResource) -> Worker:
            if announcer is None:
                return PassiveWorker(resource)
            return DatabaseWorker(
                resource,
                settings=settings,
                announcer=announcer,
                contexts=contexts,
                prober=self.prober,
                probe_slots=probe_slots,
            )

        supervisor = Supervisor(make_worker=make_worker, announcer=announcer)
        self.supervisor = supervisor
        selection = Selection(settings.resources, [static_resource(d) for d in settings.databases])

        def on_synced(count: int) -> None:
            if not self.synced.is_set():
                self.synced.set()
                logger.info(
                    "agent synced in %.3fs: serving %d databases", time.monotonic() - began, count
                )

        processes = settings.listener.processes if settings.listener is not None else 1
        if child is not None:
            logger.info(
                "listener process %d of agent %s (host_id %s, leader pid %d) starting",
                child.index,
                identity.hostname,
                identity.host_id,
                child.leader_pid,
            )
        else:
            logger.info(
                "agent %s (host_id %s, addr %s) starting: %d matchers, %d static databases, "
                "health every %s, heartbeat TTL %s%s",
                identity.hostname,
                identity.host_id,
                identity.addr,
                len(settings.resources),
                len(settings.databases),
                format_duration(settings.health_check.interval),
                format_duration(settings.heartbeat.ttl),
                f", {processes} listener processes" if processes > 1 else "",
            )
        auth = self.iam = IamAuth()
        managed = None
        if settings.managed_users.enabled:
            handles_now = supervisor.handles
            managed = build_service(
                settings,
                bus=bus,
                host_id=identity.host_id,
                auth=auth,
                served=lambda: [h.worker.resource for h in list(handles_now.values())],
                acl_membership=self.acl_membership,
                matcher_role=selection.role,
                read_only=child is not None,
            )
            self.managed = managed
        listener = None
        if settings.listener is not None:
            handles = supervisor.handles
            spool = open_spool(
                settings.data_dir,
                child.index if child is not None else 0,
                max_bytes=int(settings.listener.audit.spool_max_bytes),
                processes=processes,
            )

            def lookup(name: str) -> DatabaseResource | None:
                handle = handles.get(name)
                return handle.worker.resource if handle is not None else None

            listener = Listener(
                hostname=settings.hostname,
                listen_addr=settings.listen_addr,
                host_aliases=settings.host_aliases,
                upstream_ca_file=settings.upstream_ca_file,
                config=settings.listener,
                bus=bus,
                host_id=identity.host_id,
                lookup=lookup,
                contexts=contexts,
                login=IamLogins(auth, matcher_role=selection.role)
                if managed is None
                else ManagedLogins(managed, IamLogins(auth, matcher_role=selection.role)),
                offline_grace=settings.offline_grace,
                audit_spool=spool,
                metrics=self.metrics,
            )
            if child is None:
                if processes > 1:
                    check_address_free(settings.listen_addr)
                await listener.start(reuse_port=processes > 1)  # before the first heartbeat
                self.listener = listener
        else:
            logger.warning(
                "no db_service.listener configured: this agent accepts no clients; it only "
                "checks and announces its databases"
            )
        self.metrics.levels(lambda: self._levels(supervisor, listener))
        roots = RootTasks(stop, expected=EXPECTED)
        try:
            async with roots:
                roots.start(
                    "registry-watch",
                    follow_registry(
                        bus=bus,
                        selection=selection,
                        supervisor=supervisor,
                        on_synced=on_synced,
                        watched=self.watched,
                    ),
                )
                if managed is not None:
                    roots.start("managed-users", managed.run())
                if renewer is not None and child is None:
                    roots.start("cert-renewal", renewer.run())
                if child is not None:
                    roots.start("leader", follow_leader(child.leader_pid), on_return="stop")
                if self.listener is not None:
                    _start_listener(roots, self.listener)
                await supervisor.adjust(selection.static)  # static ones need no registry
                if child is not None and listener is not None:
                    # Only once the registry is read: the kernel hands a listening
                    # process connections at once, and it must know the databases by then.
                    await self.synced.wait()
                    await listener.start(reuse_port=True)
                    self.listener = listener
                    _start_listener(roots, listener)
                elif child is None and processes > 1:
                    self.processes = ListenerProcesses(
                        processes,
                        spec=ListenerProcess(
                            0,
                            identity.host_id,
                            os.getpid(),
                            self.config.model_dump(mode="json"),
                            self.nats.settings.model_dump(mode="json", exclude_none=True),
                        ),
                        argv=self.process_argv,
                    )
                    self.processes.start()
        finally:
            await self._stop(supervisor, managed)
        if roots.failed:
            logger.error(
                "%s stopped: %s failed",
                "listener process" if child is not None else "agent",
                ", ".join(roots.failed),
            )
            return 1
        logger.info("listener process stopped" if child is not None else "agent stopped")
        return 0

    def _buckets(self) -> list[BucketSpec]:
        """The buckets the agent writes, made at its start if missing."""
        wanted = [BUCKETS[subjects.DB_SERVERS_BUCKET]]
        if self.settings.managed_users.enabled:
            wanted.append(leases.LEASES)
        return wanted

    async def _start_diag(self, child: ListenerProcess | None) -> None:
        """The diagnostics listener (``db_service.diag_addr``): port + K in listener
        process K, so that every process of the agent is scraped on its own."""
        addr = self.settings.diag_addr
        if addr is None:
            return
        if child is not None:
            host, port = split_host_port(addr)
            addr = join_host_port(host, port + child.index)
        diag = DiagServer(
            addr,
            self.metrics.registry,
            self._readiness,
            process="agent" if child is None else f"agent listener process {child.index}",
        )
        try:
            await diag.start()
        except OSError as exc:
            raise ConfigError(f"db_service.diag_addr {addr}: cannot listen ({exc})") from None
        self.diag = diag
        logger.info("diagnostics on http://%s/ (metrics, healthz, readyz)", addr)

    def _readiness(self) -> list[Check]:
        connected = self.bus is not None and self.bus.connected
        checks = [
            Check("nats", connected, "" if connected else "not connected to NATS"),
            Check(
                "registry",
                self.synced.is_set(),
                "" if self.synced.is_set() else "the registry has not been read yet",
            ),
        ]
        if self.settings.listener is not None:
            up = self.listener is not None
            checks.append(
                Check(
                    "listener",
                    up,
                    self.settings.listen_addr
                    if up
                    else f"not listening on {self.settings.listen_addr} yet",
                )
            )
        return checks

    def _levels(self, supervisor: Supervisor, listener: Listener | None) -> list[Metric]:
        """The agent's levels, read when scraped (nothing counted on the command path)."""
        out: list[Metric] = [
            gauge(
                "fleetgate_agent_registry_entries_watched",
                "Registry entries the agent's watch sees (served or not)",
                len(self.watched),
            ),
            gauge(
                "fleetgate_agent_databases_served",
                "Databases this agent serves (registry entries selected and static)",
                len(supervisor.handles),
            ),
        ]
        states = [
            (name, getattr(h.worker, "state", None)) for name, h in supervisor.handles.items()
        ]
        out.append(
            labelled_gauge(
                "fleetgate_agent_database_healthy",
                "1 when the database's last health checks passed, 0 when they failed "
                "(absent while unknown)",
                "database",
                [
                    (name, 1.0 if state.status == "healthy" else 0.0)
                    for name, state in states
                    if state is not None and state.status in ("healthy", "unhealthy")
                ],
            )
        )
        announcer = supervisor.announcer
        if announcer is not None:
            out += [
                counter(
                    "fleetgate_agent_heartbeats_written",
                    "Heartbeats written to the registry",
                    announcer.writes,
                ),
                counter(
                    "fleetgate_agent_heartbeat_failures",
                    "Heartbeats not written (NATS unreachable or slow)",
                    announcer.failures,
                ),
            ]
            if announcer.last_write is not None:
                out.append(
                    gauge(
                        "fleetgate_agent_heartbeat_age_seconds",
                        "Seconds since the agent last wrote a heartbeat",
                        time.monotonic() - announcer.last_write,
                    )
                )
        if self.renewer is not None:
            renewer = self.renewer
            if renewer.status.expires is not None:
                out.append(
                    gauge(
                        "fleetgate_agent_certificate_expiry_timestamp_seconds",
                        "When the agent's own certificate (db_service.join) expires, Unix time",
                        renewer.status.expires.timestamp(),
                    )
                )
            out += [
                counter(
                    "fleetgate_agent_certificate_renewals",
                    "Renewals of the agent's own certificate that succeeded",
                    renewer.renewals,
                ),
                counter(
                    "fleetgate_agent_certificate_renewal_failures",
                    "Renewal attempts of the agent's own certificate that failed",
                    renewer.failures,
                ),
            ]
        calls: dict[str, int] = {}
        if self.iam is not None:
            out.append(
                counter(
                    "fleetgate_agent_iam_tokens_signed",
                    "IAM authentication tokens signed (new sessions and renewals)",
                    self.iam.tokens_signed,
                )
            )
            calls.update(self.iam.calls)
        if self.managed is not None:
            for op, n in self.managed.calls.items():
                calls[op] = calls.get(op, 0) + n
            out += [
                labelled_counter(
                    "fleetgate_agent_managed_cycles",
                    "Managed-user cycles by outcome (set-up, rotated, repaired, not-due, "
                    "held, lost, skipped)",
                    "outcome",
                    self.managed.rotator.outcomes.items(),
                ),
                counter(
                    "fleetgate_agent_managed_failures",
                    "Managed-user cycles or look-ups that failed",
                    self.managed.errors,
                ),
            ]
        out.append(
            labelled_counter(
                "fleetgate_agent_aws_calls",
                "AWS calls of IAM logins and managed users, by operation",
                "operation",
                calls.items(),
            )
        )
        if listener is not None:
            audit = listener.audit
            out += [
                gauge(
                    "fleetgate_agent_sessions_active",
                    "Client sessions open now (past their handshake)",
                    listener.established,
                ),
                counter(
                    "fleetgate_agent_audit_events_published",
                    "Audit events published to the audit stream",
                    audit.published_total,
                ),
                counter(
                    "fleetgate_agent_audit_events_dropped",
                    "Audit events lost to a full queue (reported as audit.dropped)",
                    audit.dropped_total,
                ),
                gauge(
                    "fleetgate_agent_audit_events_held",
                    "Audit events not published yet (queued, spooled or being retried)",
                    audit.backlog,
                ),
                gauge(
                    "fleetgate_agent_audit_events_spooled",
                    "Of those, audit events kept in the spool on disk",
                    audit.spool.pending_events if audit.spool is not None else 0,
                ),
            ]
        return out

    async def _stop(self, supervisor: Supervisor, managed: ManagedUsers | None) -> None:
        """After the root tasks: end what they left behind, in order, waiting for each."""
        if self.processes is not None:
            self.processes.signal_stop()  # they stop beside this one
        if supervisor.announcer is not None:
            logger.info("stopping: deleting %d heartbeats", len(supervisor.handles))
        if managed is not None:
            await _close("the managed-user service", managed.aclose(), CLOSE_TIMEOUT)
        if self.listener is not None:
            await self.listener.aclose()
        await supervisor.stop_all()
        if self.processes is not None:
            await self.processes.aclose()


def _start_listener(roots: RootTasks, listener: Listener) -> None:
    """The listener's loops as root tasks: the accept loop, the fleet CA and roles
    watches, the end of sessions at the agent's certificate's expiry, and the one-shot
    check of the audit stream. Its sessions are its own (:meth:`Listener.aclose`)."""
    roots.start("client-listener", listener.accept())
    roots.start("fleet-ca-watch", listener.trust.follow(listener.bus))
    roots.start("roles-watch", listener.roles.follow())
    roots.start("fleet-link", listener.link.follow())
    roots.start("own-cert-expiry", listener.expire_sessions())
    roots.start("audit-stream", listener.check_audit_stream(), on_return="done")


async def _close(what: str, closing: Awaitable[None], limit: float) -> None:
    """Await ``closing`` up to ``limit`` seconds; a failure is logged, not raised, so
    the rest of the stop still happens."""
    try:
        await asyncio.wait_for(closing, limit)
    except TimeoutError:
        logger.warning("stopping %s took more than %gs; left unfinished", what, limit)
    except Exception:
        logger.exception("stopping %s failed", what)


def default_argv() -> list[str]:
    """The command of a listener process, before ``--listener-process K``."""
    level = logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower()
    if level not in ("debug", "info", "warning", "error"):
        level = "info"
    return [
        sys.executable,
        "-m",
        "fleetgate",
        "agent",
        "run",
        "-c",
        "-",
        "--log-level",
        level,
        "--log-format",
        log_format(),
    ]


async def run_agent(
    config: AgentConfig,
    *,
    nats_url: str | NatsConnection,
    listener_process: ListenerProcess | None = None,
    process_argv: Sequence[str] | None = None,
) -> int:
    """The ``fleetgate agent run`` process: serve until SIGTERM or SIGINT (or, in a
    listener process, until its leader is gone)."""
    stop = asyncio.Event()
    stop_on_signals(stop)
    if listener_process is not None:
        die_with_leader()
        # Ctrl-C reaches the whole process group; the leader stops its listener
        # processes itself (SIGTERM), in order.
        asyncio.get_running_loop().remove_signal_handler(signal.SIGINT)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    agent = Agent(
        config,
        nats_url=nats_url,
        listener_process=listener_process,
        process_argv=process_argv,
    )
    return await agent.run(stop)
