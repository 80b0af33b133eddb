"""The agent process: one bus connection, the registry watch, one supervisor of
per-database workers, and a graceful stop on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from bus import BUCKETS, Bus, DatabaseResource, leases, subjects
from dbservice.agent.config import AgentConfig
from dbservice.agent.health import Prober, TLSContexts, probe
from dbservice.agent.heartbeat import AgentIdentity, Announcer
from dbservice.agent.iam_login import IamLogins
from dbservice.agent.identity import DataDir
from dbservice.agent.listener import Listener
from dbservice.agent.served import Selection, follow_registry, static_resource
from dbservice.agent.supervisor import Supervisor
from dbservice.agent.worker import DatabaseWorker
from dbservice.managed.login import ManagedLogins
from dbservice.managed.membership import AclMembership
from dbservice.managed.service import ManagedUsers
from dbservice.managed.wiring import build_service
from dbservice.upstream.iam import IamAuth
from fleetgate import __version__
from fleetgate.aio import stop_on_signals
from fleetgate.durations import format_duration

logger = logging.getLogger(__name__)

CLOSE_TIMEOUT = 3.0
PROBE_CONCURRENCY = 64
"""Health probes in flight at once over all databases (each holds a socket)."""


class Agent:
    """One agent. :meth:`run` serves until ``stop`` is set; ``supervisor`` and
    ``synced`` are there for whoever embeds it (tests, the sandbox)."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        nats_url: str,
        prober: Prober = probe,
        acl_membership: AclMembership | None = None,
    ) -> None:
        self.config = config
        self.acl_membership = acl_membership
        """How managed users' ACL membership is read (default: from the config)."""
        self.managed: ManagedUsers | None = None
        """The managed-user service (None when ``managed_users.enabled`` is false)."""
        self.settings = config.db_service
        self.nats_url = nats_url
        self.prober = prober
        self.synced = asyncio.Event()
        """Set once the first registry snapshot has been reconciled."""
        self.supervisor: Supervisor | None = None
        self.identity: AgentIdentity | None = None
        self.bus: Bus | None = None
        self.listener: Listener | None = None
        """The client listener (None without ``db_service.listener``)."""

    async def run(self, stop: asyncio.Event) -> int:
        """0 after a graceful stop, 1 when the registry watch failed."""
        began = time.monotonic()
        data_dir = DataDir.open(self.settings.data_dir)
        try:
            bus = await Bus.connect(
                self.nats_url,
                name=f"fleetgate-agent {self.settings.hostname}",
                reconnect_wait=0.5,
                wait=self.config.nats.start_wait,
            )
            self.bus = bus
            try:
                await bus.provision(BUCKETS[subjects.DB_SERVERS_BUCKET])
                if self.settings.managed_users.enabled:
                    await bus.provision(leases.LEASES)
                self.identity = AgentIdentity(
                    host_id=data_dir.host_id,
                    hostname=self.settings.hostname,
                    version=__version__,
                    addr=self.settings.advertise(),
                )
                return await self._serve(bus, self.identity, stop, began)
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(bus.close(), CLOSE_TIMEOUT)
        finally:
            data_dir.close()

    async def _serve(
        self, bus: Bus, identity: AgentIdentity, stop: asyncio.Event, began: float
    ) -> int:
        settings = self.settings
        announcer = Announcer(bus=bus, identity=identity, ttl=settings.heartbeat.ttl)
        contexts = TLSContexts(extra_ca_file=settings.upstream_ca_file)
        probe_slots = asyncio.Semaphore(PROBE_CONCURRENCY)

        def make_worker(resource: DatabaseResource) -> DatabaseWorker:
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

        logger.info(
            "agent %s (host_id %s, addr %s) starting: %d matchers, %d static databases, "
            "health every %s, heartbeat TTL %s",
            identity.hostname,
            identity.host_id,
            identity.addr,
            len(settings.resources),
            len(settings.databases),
            format_duration(settings.health_check.interval),
            format_duration(settings.heartbeat.ttl),
        )
        auth = IamAuth()
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
            )
            self.managed = managed
        listener = None
        if settings.listener is not None:
            handles = supervisor.handles

            def lookup(name: str) -> DatabaseResource | None:
                handle = handles.get(name)
                return handle.worker.resource if handle is not None else None

            listener = Listener(
                settings=settings,
                config=settings.listener,
                bus=bus,
                host_id=identity.host_id,
                lookup=lookup,
                contexts=contexts,
                login=IamLogins(auth, matcher_role=selection.role)
                if managed is None
                else ManagedLogins(managed, IamLogins(auth, matcher_role=selection.role)),
            )
            await listener.start()  # before the first heartbeat announces this agent
            self.listener = listener
        else:
            logger.warning(
                "no db_service.listener configured: this agent accepts no clients; it only "
                "checks and announces its databases"
            )
        await supervisor.adjust(selection.static)  # static ones need no registry
        watch = asyncio.create_task(
            follow_registry(
                bus=bus, selection=selection, supervisor=supervisor, on_synced=on_synced
            ),
            name="registry-watch",
        )
        stopping = asyncio.create_task(stop.wait(), name="stop-signal")
        rotating = (
            asyncio.create_task(managed.run(), name="managed-users")
            if managed is not None
            else None
        )
        status = 0
        roots = {watch, stopping}
        if listener is not None and listener.task is not None:
            roots.add(listener.task)
        try:
            await asyncio.wait(roots, return_when=asyncio.FIRST_COMPLETED)
            for root in roots - {stopping}:
                if root.done():
                    status = 1
                    error = None if root.cancelled() else root.exception()
                    logger.error("%s ended (%s); stopping", root.get_name(), error or "returned")
        finally:
            logger.info("stopping: deleting %d heartbeats", len(supervisor.handles))
            for task in (watch, stopping, rotating):
                if task is None:
                    continue
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            if managed is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(managed.aclose(), CLOSE_TIMEOUT)
            if listener is not None:
                await listener.aclose()
            await supervisor.stop_all()
        logger.info("agent stopped")
        return status


async def run_agent(config: AgentConfig, *, nats_url: str) -> int:
    """The ``fleetgate agent run`` process: serve until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    stop_on_signals(stop)
    return await Agent(config, nats_url=nats_url).run(stop)
