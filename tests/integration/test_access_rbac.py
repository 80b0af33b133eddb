"""RBAC table tests: allow, deny, no role, db user templating, command globs."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from bus import Bus, subjects
from bus.access import Identity, Role
from bus.client import FAILURES
from bus.server import NatsServer
from dbservice.access.rbac import (
    FAMILIES,
    CommandPolicy,
    can_reach,
    check_command,
    check_db_access,
)


def role(name: str, **spec: Any) -> Role:
    return Role.model_validate({"name": name, **spec})


DEV = role(
    "payments-dev",
    allow={
        "db_labels": {"env": ["dev", "staging"], "team": "payments"},
        "db_users": ["app", "{{internal.db_users}}"],
        "redis_commands": ["*"],
    },
    deny={
        "db_labels": {"pci": "true"},
        "redis_commands": ["FLUSHALL", "FLUSHDB", "CONFIG*", "KEYS"],
    },
)
READER = role(
    "reader",
    allow={
        "db_labels": {"env": "prod"},
        "db_users": ["ro-*"],
        "redis_commands": ["GET", "MGET", "H*"],
    },
)
NO_ADMIN = role("no-admin", deny={"db_users": ["admin"]})
EVERYTHING = role("everything", allow={"db_labels": {"*": "*"}, "db_users": ["*"]})

DEV_DB = {"env": "dev", "team": "payments"}
PCI_DB = {"env": "dev", "team": "payments", "pci": "true"}
PROD_DB = {"env": "prod", "team": "payments"}


@pytest.mark.parametrize(
    ("roles", "labels", "db_user", "allowed", "reason_part"),
    [
        ([DEV], DEV_DB, "app", True, "payments-dev"),
        ([DEV], {"env": "staging", "team": "payments"}, "app", True, ""),
        ([DEV], DEV_DB, "alice-rw", True, ""),  # from {{internal.db_users}}
        ([DEV], DEV_DB, "admin", False, "as db user 'admin'"),
        ([DEV], PROD_DB, "app", False, "none of your roles allows access"),
        ([DEV], {"env": "dev"}, "app", False, "none of your roles"),  # team label missing
        ([DEV], PCI_DB, "app", False, "role payments-dev denies access"),
        ([DEV, EVERYTHING], PCI_DB, "app", False, "denies"),  # deny beats another allow
        ([EVERYTHING, NO_ADMIN], DEV_DB, "admin", False, "denies db user 'admin'"),
        ([EVERYTHING, NO_ADMIN], DEV_DB, "app", True, ""),
        ([READER], PROD_DB, "ro-batch", True, ""),
        ([READER], PROD_DB, "rw", False, ""),
        ([], DEV_DB, "app", False, "no roles"),
        ([NO_ADMIN], DEV_DB, "app", False, "none of your roles"),  # deny-only role
    ],
)
def test_db_access(
    roles: list[Role], labels: dict[str, str], db_user: str, allowed: bool, reason_part: str
) -> None:
    decision = check_db_access(roles, ["alice-rw"], labels, db_user, database="orders")
    assert decision.allowed is allowed, decision.reason
    assert reason_part in decision.reason


def test_templating_without_own_db_users_adds_nothing() -> None:
    assert not check_db_access([DEV], [], DEV_DB, "{{internal.db_users}}")
    assert not check_db_access([DEV], [], DEV_DB, "alice-rw")


@pytest.mark.parametrize(
    ("roles", "command", "allowed"),
    [
        ([DEV], "get", True),
        ([DEV], "SET", True),
        ([DEV], "FLUSHALL", False),
        ([DEV], "config", False),
        ([DEV], "CONFIGX", False),
        ([DEV], "KEYS", False),
        ([DEV], "KEYSPACE", True),  # exact name, not a prefix
        ([READER], "GET", True),
        ([READER], "HGETALL", True),
        ([READER], "SET", False),
        ([EVERYTHING], "FLUSHALL", True),  # allow.redis_commands absent: every command
        ([EVERYTHING, DEV], "FLUSHALL", False),  # a deny in any role wins
        ([], "GET", False),
    ],
)
def test_command(roles: list[Role], command: str, allowed: bool) -> None:
    assert check_command(roles, command).allowed is allowed


def test_command_policy_takes_allows_only_from_granting_roles() -> None:
    # Connected to prod through READER: DEV's "*" must not widen the commands.
    roles = [DEV, READER]
    access = check_db_access(roles, [], PROD_DB, "ro-x")
    assert access.roles == ("reader",)
    policy = CommandPolicy.build(roles, granting=access.roles)
    assert policy.check("GET").allowed
    assert not policy.check("SET").allowed
    assert not policy.check("FLUSHDB").allowed
    assert policy.check("KEYS").reason == "role payments-dev denies the command KEYS"


def test_command_policy_caches_bounded() -> None:
    policy = CommandPolicy.build([DEV])
    assert policy.check("get") is policy.check("GET")
    for i in range(3000):
        policy.check(f"X{i}")
    assert len(policy._cache) <= 1024


async def test_authorize_session_reads_current_roles(bus: Bus) -> None:
    """A role edited after login applies to the next session, without a new login."""
    from bus.access import put_role
    from dbservice.access.authorize import authorize_session, trusted_cas

    alice = Identity(user="alice", roles=("payments-dev", "gone"), db_users=("alice-rw",))
    await put_role(bus, DEV)
    grant = await authorize_session(bus, alice, database="orders", labels=DEV_DB, db_user="app")
    assert grant.allowed and grant.commands.check("GET") and not grant.commands.check("KEYS")
    narrowed = DEV.model_copy(update={"allow": DEV.allow.model_copy(update={"db_users": ("ro",)})})
    await put_role(bus, narrowed)
    grant = await authorize_session(bus, alice, database="orders", labels=DEV_DB, db_user="app")
    assert not grant.allowed and "as db user 'app'" in grant.decision.reason
    assert not grant.commands.check("GET")
    assert await trusted_cas(bus) == []


def test_can_reach_for_listings() -> None:
    assert can_reach([DEV], DEV_DB)
    assert not can_reach([DEV], PCI_DB)
    assert not can_reach([DEV], PROD_DB)
    assert can_reach([DEV, READER], PROD_DB)
    assert not can_reach([], DEV_DB)


@pytest.mark.parametrize(
    ("deny", "command", "reason"),
    [
        (["DEL"], "UNLINK", "role r denies the command DEL, and so UNLINK, which does the same"),
        (["DEL"], "GETDEL", "role r denies the command DEL, and so GETDEL"),
        (["UNLINK"], "DEL", "role r denies the command UNLINK, and so DEL"),
        (["FLUSHALL"], "FLUSHDB", "and so FLUSHDB"),
        (["flushdb"], "FLUSHALL", "and so FLUSHALL"),
        (["KEYS"], "SCAN", "and so SCAN"),
        (["EVAL"], "FCALL_RO", "and so FCALL_RO"),
        (["SLAVEOF"], "REPLICAOF", "and so REPLICAOF"),
        (["FLUSHALL"], "FLUSHALL\0x", "NUL byte"),
        (["FLUSHALL"], "EVAL", "EVAL runs server-side code"),
        (["FLUSHALL"], "SCRIPT", "a role must allow SCRIPT by name"),
        (["FLUSHALL"], "FUNCTION", "a role must allow FUNCTION by name"),
    ],
)
def test_a_deny_means_what_it_names(deny: list[str], command: str, reason: str) -> None:
    role = Role.model_validate(
        {"name": "r", "allow": {"db_labels": {"env": "dev"}}, "deny": {"redis_commands": deny}}
    )
    decision = CommandPolicy.build([role]).check(command)
    assert not decision.allowed and reason in decision.reason
    assert CommandPolicy.build([role]).check("GET").allowed


def test_scripts_need_allowing_by_name_only_when_commands_are_limited() -> None:
    unlimited = Role.model_validate({"name": "u", "allow": {"db_labels": {"env": "dev"}}})
    assert CommandPolicy.build([unlimited]).check("EVAL").allowed  # no rule: no limit
    by_name = Role.model_validate(
        {
            "name": "s",
            "allow": {"db_labels": {"env": "dev"}, "redis_commands": ["*", "eval", "FCALL"]},
            "deny": {"redis_commands": ["FLUSHALL"]},
        }
    )
    policy = CommandPolicy.build([by_name])
    assert policy.check("EVAL").allowed and policy.check("FCALL").allowed
    assert not policy.check("EVALSHA").allowed  # not named
    globbed = Role.model_validate(
        {"name": "g", "allow": {"db_labels": {"env": "dev"}, "redis_commands": ["E*", "GET"]}}
    )
    assert not CommandPolicy.build([globbed]).check("EVAL").allowed  # an allow list limits
    # a deny of the family beats a name
    both = Role.model_validate(
        {
            "name": "b",
            "allow": {"db_labels": {"env": "dev"}, "redis_commands": ["*", "EVAL"]},
            "deny": {"redis_commands": ["EVALSHA"]},
        }
    )
    assert (
        "denies the command EVALSHA, and so EVAL"
        in CommandPolicy.build([both]).check("EVAL").reason
    )


@pytest.mark.parametrize("pattern", ["CLIENT KILL", "client|kill", " ", "CONFIG\0"])
def test_a_rule_that_could_never_match_is_refused(pattern: str) -> None:
    with pytest.raises(ValueError, match="rules name whole commands"):
        Role.model_validate({"name": "r", "deny": {"redis_commands": [pattern]}})


def test_command_families_are_a_constant() -> None:
    """Built once, read-only: no module fills or changes it after import."""
    assert FAMILIES["GETDEL"] == ("DEL", "UNLINK")
    assert FAMILIES["UNLINK"] == ("DEL",)
    assert FAMILIES["EVAL"] == ("EVALSHA", "EVAL_RO", "EVALSHA_RO", "FCALL", "FCALL_RO")
    with pytest.raises(TypeError):
        FAMILIES["FLUSHALL"] = ()  # type: ignore[index]


async def test_the_role_cache_answers_only_while_its_watch_is_live(
    nats_server: NatsServer,
) -> None:
    """The agent's RoleCache: roles from its watch once synced, edits and deletions as
    they are pushed; while NATS is away (and after a reconnect until the watch has its
    new snapshot) it answers None, so the session reads the roles, which fails."""
    from bus.access import put_role
    from bus.server import wait_port_free
    from dbservice.access.authorize import RoleCache, authorize_session
    from tests.kits.agent import wait_until

    admin = await Bus.connect(nats_server.url, name="admin")
    agent = await Bus.connect(nats_server.url, name="agent", reconnect_wait=0.1)
    try:
        await admin.provision()
        await put_role(admin, DEV)
        cache = RoleCache(agent)
        assert cache.roles(("payments-dev",)) is None  # not synced yet
        follow = asyncio.create_task(cache.follow())
        try:
            await wait_until(lambda: cache.live, 10, "the roles watch synced")
            assert cache.roles(("payments-dev", "gone")) == [DEV]
            alice = Identity(user="alice", roles=("payments-dev",))
            grant = await authorize_session(
                agent, alice, database="orders", labels=DEV_DB, db_user="app", cache=cache
            )
            assert grant.allowed
            await admin.delete(subjects.ROLES_BUCKET, subjects.role_key("payments-dev"))
            await wait_until(lambda: cache.roles(("payments-dev",)) == [], 10, "the deletion")

            port = nats_server.port
            nats_server.stop()
            wait_port_free("127.0.0.1", port)
            await wait_until(lambda: not cache.live, 10, "the cache no longer live")
            assert cache.roles(("payments-dev",)) is None
            with pytest.raises(FAILURES):  # no stale answer: the read fails
                await asyncio.wait_for(
                    authorize_session(
                        agent, alice, database="orders", labels=DEV_DB, db_user="app",
                        cache=cache,
                    ),
                    2,
                )  # fmt: skip
            nats_server.port = port
            nats_server.start()
            await wait_until(lambda: cache.live, 20, "the watch live again after a reconnect")
            assert cache.roles(("payments-dev",)) == []
        finally:
            follow.cancel()
            await asyncio.wait([follow])
    finally:
        await agent.close()
        await admin.close()
