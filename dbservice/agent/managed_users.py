"""The managed-user service of one agent, built from its config."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from bus import Bus, DatabaseResource
from bus.labels import matches
from dbservice.agent.config import DbService
from dbservice.managed.membership import AclMembership, membership
from dbservice.managed.rotation import StepHook, no_hook
from dbservice.managed.service import ManagedUsers, SecretStore, ServiceSettings
from dbservice.upstream.iam import IamAuth, Role


def build_service(
    settings: DbService,
    *,
    bus: Bus,
    host_id: str,
    auth: IamAuth,
    served: Callable[[], Iterable[DatabaseResource]],
    acl_membership: AclMembership | None = None,
    hook: StepHook = no_hook,
    matcher_role: Callable[[DatabaseResource], Role | None] = lambda _: None,
    read_only: bool = False,
) -> ManagedUsers:
    config = settings.managed_users
    default = SecretStore(config.secret_store.key_prefix, config.secret_store.kms_key_id)

    def store_of(resource: DatabaseResource) -> SecretStore:
        """The last matching matcher's ``secret_store``, else the agent-wide one."""
        store = default
        for matcher in settings.resources:
            if matcher.secret_store is not None and matches(
                matcher.labels, resource.metadata.labels
            ):
                store = SecretStore(
                    matcher.secret_store.key_prefix, matcher.secret_store.kms_key_id
                )
        return store

    return ManagedUsers(
        bus,
        host_id=host_id,
        auth=auth,
        served=served,
        settings=ServiceSettings(
            interval=config.interval,
            lease=config.lease,
            refresh=config.refresh,
            grace=config.grace,
            recovery_days=config.recovery_days,
            cleanup=config.cleanup,
        ),
        store_of=store_of,
        matcher_role=matcher_role,
        membership=acl_membership or membership(config.acl_lookup),
        hook=hook,
        read_only=read_only,
    )
