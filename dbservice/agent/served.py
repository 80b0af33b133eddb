"""Which databases this agent serves: registry databases its matchers select, plus
its static ones; and the loop that keeps the supervisor in step with the registry.

A registry database is served as it is in the registry, with its own
``assume_role_arn``/``external_id``; the selecting matcher's AWS role is kept apart
(:meth:`Selection.role`) and assumed first, the database's role then chained after it
(:class:`~dbservice.upstream.iam.IamTarget`)."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from bus import Bus
from bus import labels as L
from bus.labels import matches
from bus.schemas import DatabaseResource, DatabaseSpec, Metadata, TLSSettings
from dbservice.agent.config import ResourceMatcher, StaticDatabase
from dbservice.agent.supervisor import Supervisor
from dbservice.upstream.iam import Role

logger = logging.getLogger(__name__)

ORIGIN_CONFIG = "config"
"""``fleetgate.dev/origin`` of static databases (discovered ones say ``cloud``)."""


def static_resource(db: StaticDatabase) -> DatabaseResource:
    """A static database from the config, as the agent serves and announces it."""
    ca_pem = Path(db.tls.ca_file).read_text() if db.tls.ca_file else None
    return DatabaseResource(
        metadata=Metadata(
            name=db.name,
            description=db.description,
            labels={**db.static_labels, L.LABEL_ORIGIN: ORIGIN_CONFIG},
        ),
        spec=DatabaseSpec(
            protocol=db.protocol,
            uri=db.uri,
            tls=TLSSettings(mode=db.tls.mode, ca_cert=ca_pem, server_name=db.tls.server_name),
        ),
    )


class Selection:
    """The matchers and static databases of one agent. Pure."""

    def __init__(
        self, matchers: Sequence[ResourceMatcher], static: Iterable[DatabaseResource]
    ) -> None:
        self.matchers = list(matchers)
        self.static = {db.name: db for db in static}

    def select(self, resource: DatabaseResource) -> DatabaseResource | None:
        """``resource`` when a matcher selects it (served as it is, its own AWS role
        kept: see :meth:`role`), None when none does or a static database has its name."""
        if resource.name in self.static:
            return None
        labels = resource.metadata.labels
        if not any(matches(matcher.labels, labels) for matcher in self.matchers):
            return None
        return resource

    def role(self, resource: DatabaseResource) -> Role | None:
        """The AWS role of the last matching matcher that has one: the agent assumes it
        first, then the database's own ``assume_role_arn`` (role chaining) when the
        record has one. None for static databases and when no matcher sets a role."""
        if resource.name in self.static:
            return None
        role = None
        for matcher in self.matchers:
            aws = matcher.aws
            if (
                aws is not None
                and aws.assume_role_arn
                and matches(matcher.labels, resource.metadata.labels)
            ):
                role = Role(aws.assume_role_arn, aws.external_id)
        return role

    def desired(self, registry: Iterable[DatabaseResource]) -> dict[str, DatabaseResource]:
        out = dict(self.static)
        for resource in registry:
            served = self.select(resource)
            if served is not None:
                out[served.name] = served
        return out


async def follow_registry(
    *,
    bus: Bus,
    selection: Selection,
    supervisor: Supervisor,
    on_synced: Callable[[int], None] | None = None,
    watched: set[str] | None = None,
) -> None:
    """Watch the registry forever: at each ``synced`` reconcile the whole set (the only
    time anything absent is removed); between, apply each change at once. Only the
    databases this agent serves are kept, keyed by registry key. ``watched``, when
    given, is kept as the keys of every registry entry (served or not: the metrics)."""
    chosen: dict[str, DatabaseResource] = {}
    shadowed: set[str] = set()
    synced = False
    seen = 0
    async with contextlib.aclosing(bus.watch_resources()) as events:
        async for event in events:
            if event.kind == "upsert" and event.value is not None:
                seen += 1
                if watched is not None:
                    watched.add(event.key)
                resource = event.value
                if resource.name in selection.static and resource.name not in shadowed:
                    shadowed.add(resource.name)
                    logger.warning(
                        "registry database %s has the name of a static database; serving the "
                        "static one",
                        resource.name,
                    )
                served = selection.select(resource)
                old = chosen.pop(event.key, None)
                if served is not None:
                    chosen[event.key] = served
                if not synced:
                    continue
                if served is not None:
                    supervisor.upsert(served)
                elif old is not None:
                    await supervisor.remove(old.name, "no longer matches")
            elif event.kind == "deleted":
                if watched is not None:
                    watched.discard(event.key)
                old = chosen.pop(event.key, None)
                if synced and old is not None:
                    await supervisor.remove(old.name, "deleted from the registry")
            elif event.kind == "synced":
                started = time.monotonic()
                desired = dict(selection.static)
                desired.update((r.name, r) for r in chosen.values())
                await supervisor.adjust(desired)
                if not synced:
                    logger.info(
                        "registry synced: %d databases read, %d served (%.2fs to reconcile)",
                        seen,
                        len(supervisor.handles),
                        time.monotonic() - started,
                    )
                synced = True
                if on_synced is not None:
                    on_synced(len(supervisor.handles))
