"""The rotation cycle of a managed user against moto (Secrets Manager, MemoryDB users)
and a real nats-server: set-up, rotation, the lease between agents, the idempotent
secret write, a crash between PutSecretValue and UpdateUser repaired, IAM users never
touched."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bus import Bus, leases, subjects
from bus.server import NatsServer
from dbservice.managed.aws import ManagedAws, ManagedError, NotOurs, SecretConflict
from dbservice.managed.cleanup import KEPT, sweep
from dbservice.managed.rotation import RotationSettings, Rotator, Step, UserRef
from dbservice.managed.state import (
    MANAGED_BY_TAG,
    ManagedUser,
    is_managed_tag,
    new_password,
    request_token,
    secret_name,
)
from dbservice.upstream.iam import IamAuth
from fleetgate.cli import main
from sandbox.aws import USER_PASSWORDS, MotoServer
from tests.kits import seed as seed
from tests.kits.common import SAMPLE_NATS_CONF, sample_nats_passwords

pytestmark = pytest.mark.timeout(60)

NATS_CONF = SAMPLE_NATS_CONF
REGION = "us-east-1"
ACCOUNT = "123456789012"


def make_user(name: str, kind: str = "password") -> str:
    mode: dict[str, Any] = {"Type": kind}
    if kind == "password":
        mode["Passwords"] = ["initial-password-set-by-a-human-0123"]
    user = seed.client("memorydb", REGION).create_user(
        UserName=name,
        AuthenticationMode=mode,
        AccessString="on ~* +@all",
        Tags=[{"Key": "fleetgate.dev/managed", "Value": "true"}],
    )["User"]
    return str(user["ARN"])


def ref_of(name: str, arn: str) -> UserRef:
    return UserRef(
        user=name,
        region=REGION,
        account=ACCOUNT,
        user_arn=arn,
        roles=(),
        secret_name=secret_name("fleetgate/", REGION, ACCOUNT, name),
        databases=("orders",),
        clusters=("orders",),
    )


def secret(name: str, stage: str) -> dict[str, Any]:
    reply = seed.client("secretsmanager", REGION).get_secret_value(
        SecretId=name, VersionStage=stage
    )
    out: dict[str, Any] = json.loads(reply["SecretString"])
    out["version"] = reply["VersionId"]
    return out


def versions(name: str) -> list[str]:
    reply = seed.client("secretsmanager", REGION).list_secret_version_ids(
        SecretId=name, IncludeDeprecated=True
    )
    return [v["VersionId"] for v in reply["Versions"]]


@pytest.fixture
async def lease_bus(bus: Bus) -> AsyncIterator[Bus]:
    await bus.provision(leases.LEASES)
    yield bus


class Clock:
    """Time for the rotation decisions, moved by the test (AWS and NATS stay real)."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


CLOCK = Clock()
INTERVAL = 60.0
LEASE = 10.0


def rotator(bus: Bus, host: str, **kw: Any) -> Rotator:
    auth = IamAuth()
    return Rotator(
        bus,
        host,
        lambda ref: ManagedAws(auth, ref.region, ref.roles),
        RotationSettings(interval=INTERVAL, jitter=0.0, lease=LEASE),
        clock=CLOCK,
        **kw,
    )


async def record(bus: Bus, ref: UserRef) -> ManagedUser:
    found = await leases.read(bus, subjects.LEASES_BUCKET, ref.key, ManagedUser)
    assert found is not None
    return found.record


def test_pure_rules() -> None:
    assert is_managed_tag("true") and is_managed_tag("") and is_managed_tag("yes")
    for off in ("false", "No", "OFF", "disabled", " disable "):
        assert not is_managed_tag(off)
    assert not is_managed_tag(None)
    assert secret_name("x", "eu-west-1", "1", "app") == "x/memorydb/eu-west-1/1/user/app"
    password = new_password()
    assert len(password) >= 64 and password.isalnum() and password != new_password()
    with pytest.raises(ValueError):
        new_password(32)
    assert request_token("s", "v1") == request_token("s", "v1") != request_token("s", "v2")


async def test_set_up_then_rotate_keeps_two_passwords(aws: MotoServer, lease_bus: Bus) -> None:
    ref = ref_of("app", make_user("app"))
    one = rotator(lease_bus, "h1")
    assert await one.cycle(ref) == "set-up"
    first = secret(ref.secret_name, "AWSCURRENT")
    assert first["username"] == "app" and first["user_arn"] == ref.user_arn
    assert len(first["password"]) >= 64
    assert USER_PASSWORDS[(ACCOUNT, REGION, "app")] == (first["password"],)
    tags = seed.client("secretsmanager", REGION).describe_secret(SecretId=ref.secret_name)["Tags"]
    assert {t["Key"] for t in tags} >= {MANAGED_BY_TAG, "fleetgate.dev/cluster"}
    state = await record(lease_bus, ref)
    assert state.applied_version == first["version"] and not state.holder
    assert "password" not in state.model_dump_json()
    assert await one.cycle(ref) == "not-due"  # no AWS call at all
    CLOCK.advance(INTERVAL)
    assert await one.cycle(ref) == "rotated"
    second = secret(ref.secret_name, "AWSCURRENT")
    assert secret(ref.secret_name, "AWSPREVIOUS")["version"] == first["version"]
    assert USER_PASSWORDS[(ACCOUNT, REGION, "app")] == (first["password"], second["password"])
    CLOCK.advance(INTERVAL)
    assert await one.cycle(ref) == "rotated"
    third = secret(ref.secret_name, "AWSCURRENT")
    assert USER_PASSWORDS[(ACCOUNT, REGION, "app")] == (second["password"], third["password"])
    assert len(versions(ref.secret_name)) == 3


async def test_two_agents_one_rotation_per_interval(aws: MotoServer, lease_bus: Bus) -> None:
    ref = ref_of("app", make_user("app"))
    agents = [rotator(lease_bus, f"h{i}") for i in range(3)]
    outcomes = await asyncio.gather(*(a.cycle(ref) for a in agents))
    assert sorted(outcomes).count("set-up") == 1, outcomes
    for _ in range(3):
        CLOCK.advance(INTERVAL)
        outcomes = await asyncio.gather(*(a.cycle(ref) for a in agents))
        assert outcomes.count("rotated") == 1, outcomes
        assert set(outcomes) <= {"rotated", "held", "lost", "not-due"}
    assert len(versions(ref.secret_name)) == 4


async def test_the_secret_write_is_idempotent(aws: MotoServer, lease_bus: Bus) -> None:
    ref = ref_of("app", make_user("app"))
    await rotator(lease_bus, "h1").cycle(ref)
    managed = ManagedAws(IamAuth(), REGION)
    current = secret(ref.secret_name, "AWSCURRENT")["version"]
    token = request_token(ref.secret_name, current)
    value = json.dumps({"username": "app", "password": "a" * 64, "user_arn": ref.user_arn})
    made = await managed.put_secret(ref.secret_name, value, token=token)
    assert await managed.put_secret(ref.secret_name, value, token=token) == made  # a retry
    with pytest.raises(SecretConflict):  # another agent's password for the same step
        await managed.put_secret(ref.secret_name, value.replace("a" * 64, "b" * 64), token=token)
    assert len(versions(ref.secret_name)) == 2


async def test_a_crash_between_put_and_update_is_repaired(aws: MotoServer, lease_bus: Bus) -> None:
    ref = ref_of("app", make_user("app"))
    await rotator(lease_bus, "h1").cycle(ref)
    CLOCK.advance(INTERVAL)
    stopped = asyncio.Event()

    async def stop_there(step: Step, _: UserRef) -> None:
        if step == "secret-written":
            stopped.set()
            await asyncio.Event().wait()  # until cancelled

    crashing = rotator(lease_bus, "h1", hook=stop_there)
    task = asyncio.create_task(crashing.cycle(ref))
    await asyncio.wait_for(stopped.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # the secret is ahead of the user; the previous version is on the user
    previous = secret(ref.secret_name, "AWSPREVIOUS")
    current = secret(ref.secret_name, "AWSCURRENT")
    on_user = USER_PASSWORDS[(ACCOUNT, REGION, "app")]
    assert previous["password"] in on_user and current["password"] not in on_user
    other = rotator(lease_bus, "h2")
    assert await other.cycle(ref) == "held"  # until the crashed agent's lease runs out
    CLOCK.advance(LEASE)
    assert await other.cycle(ref) == "repaired"
    assert USER_PASSWORDS[(ACCOUNT, REGION, "app")] == (previous["password"], current["password"])
    assert (await record(lease_bus, ref)).applied_version == current["version"]
    assert len(versions(ref.secret_name)) == 2  # repaired, not rotated again


async def test_an_iam_user_is_never_changed(aws: MotoServer, lease_bus: Bus) -> None:
    ref = ref_of("robot", make_user("robot", "iam"))
    with pytest.raises(ManagedError, match="uses IAM authentication"):
        await rotator(lease_bus, "h1").cycle(ref)
    user = seed.client("memorydb", REGION).describe_users(UserName="robot")["Users"][0]
    assert user["Authentication"]["Type"] == "iam"
    assert seed.client("secretsmanager", REGION).list_secrets()["SecretList"] == []


async def test_the_sample_nats_config_lets_agents_keep_the_records(
    aws: MotoServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = NATS_CONF
    sample_nats_passwords(monkeypatch)
    server = NatsServer(tmp_path / "nats", config_file=conf).start()
    try:
        agent = await Bus.connect(
            f"nats://agent:pw-agent@127.0.0.1:{server.port}", name="agent", request_timeout=2
        )
        try:
            await agent.provision(leases.LEASES)
            ref = ref_of("app", make_user("app"))
            assert await rotator(agent, "h1").cycle(ref) == "set-up"
            assert (await record(agent, ref)).applied_version
            assert list(await leases.records(agent, subjects.LEASES_BUCKET, ManagedUser))
        finally:
            await agent.close()
    finally:
        server.stop()


def test_configure_iam_agent_includes_what_managed_users_need(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from fleetgate.cli import main

    cluster = f"arn:aws:memorydb:{REGION}:{ACCOUNT}:cluster/orders"
    assert main(["configure", "iam", "--agent", "--cluster", cluster]) == 0
    policy = json.loads(capsys.readouterr().out)
    by_sid = {s["Sid"]: s for s in policy["Statement"]}
    secrets = by_sid["FleetgateManagedUsersSecrets"]
    assert {"secretsmanager:PutSecretValue", "secretsmanager:CreateSecret"} <= set(
        secrets["Action"]
    )
    assert secrets["Resource"] == [
        f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:"
        f"fleetgate/memorydb/{REGION}/{ACCOUNT}/user/*"
    ]
    assert by_sid["FleetgateManagedUsersSetPasswords"]["Action"] == "memorydb:UpdateUser"
    assert "memorydb:DescribeACLs" in by_sid["FleetgateManagedUsersFind"]["Action"]
    kms = by_sid["FleetgateManagedUsersKms"]
    assert "kms:GenerateDataKey" in kms["Action"] and "kms:Decrypt" in kms["Action"]
    assert kms["Condition"]["StringLike"]["kms:ViaService"] == "secretsmanager.*.amazonaws.com"
    shipped = json.loads(NATS_CONF.parents[1].joinpath("iam", "agent-policy.json").read_text())
    assert main(["configure", "iam", "--agent"]) == 0
    assert json.loads(capsys.readouterr().out) == shipped


async def test_acl_membership_lookups(aws: MotoServer) -> None:
    from dbservice.managed.membership import DescribeAcls, UserAclNames, membership
    from sandbox.aws import ACL_MEMBERS, SandboxAclMembership

    make_user("app")
    make_user("bob")
    ACL_MEMBERS[(ACCOUNT, REGION, "app")] = {"orders-acl"}
    ACL_MEMBERS[(ACCOUNT, REGION, "bob")] = {"other-acl"}
    managed = ManagedAws(IamAuth(), REGION)
    users = await managed.describe_users()
    for lookup in (DescribeAcls(), UserAclNames(), SandboxAclMembership()):
        found = await lookup.members(managed, account=ACCOUNT, acl_name="orders-acl", users=users)
        assert found == {"app"}, lookup
    assert isinstance(membership("describe-users"), UserAclNames)
    with pytest.raises(ManagedError, match="ACLNotFoundFault"):
        await managed.acl_members("no-such-acl")


async def test_the_secret_store_prefix_and_kms_key_apply(aws: MotoServer, lease_bus: Bus) -> None:
    arn = make_user("app")
    ref = UserRef(
        user="app",
        region=REGION,
        account=ACCOUNT,
        user_arn=arn,
        roles=(),
        secret_name=secret_name("payments/", REGION, ACCOUNT, "app"),
        kms_key_id="alias/fleetgate",
        clusters=("orders",),
    )
    assert await rotator(lease_bus, "h1").cycle(ref) == "set-up"
    described = seed.client("secretsmanager", REGION).describe_secret(
        SecretId=f"payments/memorydb/{REGION}/{ACCOUNT}/user/app"
    )
    assert described["KmsKeyId"] == "alias/fleetgate"
    assert {t["Key"]: t["Value"] for t in described["Tags"]}["fleetgate.dev/cluster"] == "orders"


async def test_a_lost_bucket_is_created_again_and_the_user_repaired(
    aws: MotoServer, lease_bus: Bus
) -> None:
    from bus import RegistryError

    ref = ref_of("app", make_user("app"))
    one = rotator(lease_bus, "h1")
    assert await one.cycle(ref) == "set-up"
    await lease_bus.js.delete_key_value(subjects.LEASES_BUCKET)  # NATS lost its store
    with pytest.raises(RegistryError):
        await one.cycle(ref)
    assert await one.cycle(ref) == "repaired"  # no record: the user is set from the secret
    assert len(versions(ref.secret_name)) == 1
    assert (await record(lease_bus, ref)).applied_version


async def test_a_login_refused_once_tries_the_other_password_once(
    aws: MotoServer, lease_bus: Bus, tmp_path: Path
) -> None:
    from dbservice.managed.passwords import LoginRefused, ManagedPasswords
    from sandbox.valkeynode import ValkeyNode

    ref = ref_of("app", make_user("app"))
    await rotator(lease_bus, "h1").cycle(ref)
    CLOCK.advance(INTERVAL)
    await rotator(lease_bus, "h1").cycle(ref)
    previous, current = password_pair(ref)
    auth = IamAuth()
    passwords = ManagedPasswords(lease_bus, lambda r: ManagedAws(auth, r.region, r.roles))
    node = ValkeyNode(index=0, directory=tmp_path / "valkey", client_port=0)
    await node.start()
    try:

        async def login_as(*on_server: str) -> None:
            await node.command(
                "ACL",
                "SETUSER",
                "app",
                "on",
                "resetpass",
                "~*",
                "+@all",
                *(f">{p}" for p in on_server),
            )
            reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
            try:
                await passwords.login(ref, reader, writer)
            finally:
                writer.close()
                await writer.wait_closed()

        await login_as(previous, current)  # AWSPREVIOUS: one read
        assert (passwords.fetches, passwords.retries) == (1, 0)
        await login_as(previous, current)  # cached: no read
        assert (passwords.fetches, passwords.retries) == (1, 0)
        await login_as(current)  # previous already gone: the other one, once
        assert (passwords.fetches, passwords.retries) == (3, 1)
        with pytest.raises(LoginRefused, match="refused the managed password") as info:
            await login_as("neither-" + "x" * 60)
        assert previous not in str(info.value) and current not in str(info.value)
    finally:
        await node.stop()


def password_pair(ref: UserRef) -> tuple[str, str]:
    return (
        secret(ref.secret_name, "AWSPREVIOUS")["password"],
        secret(ref.secret_name, "AWSCURRENT")["password"],
    )


@pytest.mark.parametrize(
    ("managed", "field", "says"),
    [
        ({"interval": "0.5"}, "db_service.managed_users", "interval must be at least 1s"),
        ({"interval": "soon"}, "db_service.managed_users.interval", "not a duration"),
        ({"recovery_days": 3}, "db_service.managed_users.recovery_days", "7"),
        ({"acl_lookup": "guess"}, "db_service.managed_users.acl_lookup", "describe-acls"),
        ({"secret_store": {"key_prefix": "a b"}}, "key_prefix", "letters, digits"),
        ({"rotate": "5m"}, "db_service.managed_users.rotate", "unknown field"),
    ],
)
def test_managed_users_config_errors_name_the_field(
    managed: dict[str, Any], field: str, says: str
) -> None:
    from dbservice.agent.config import AgentConfig
    from fleetgate.config import ConfigError, load_model

    body = {"db_service": {"resources": [{"labels": {"env": "x"}}], "managed_users": managed}}
    with pytest.raises(ConfigError) as info:
        load_model(AgentConfig, body, "agent.yaml")
    assert field in str(info.value) and says in str(info.value)
    fine = load_model(
        AgentConfig,
        {"db_service": {"resources": [{"labels": {"env": "x"}}]}},
        "agent.yaml",
    ).db_service.managed_users
    assert (fine.enabled, fine.interval, fine.secret_store.key_prefix) == (True, 900, "fleetgate/")


async def test_a_user_whose_secret_awaits_deletion_waits_for_a_restore(
    aws: MotoServer, lease_bus: Bus
) -> None:
    ref = ref_of("app", make_user("app"))
    one = rotator(lease_bus, "h1")
    assert await one.cycle(ref) == "set-up"
    managed = ManagedAws(IamAuth(), REGION)
    await managed.delete_secret(ref.secret_name, recovery_days=7)
    CLOCK.advance(INTERVAL)
    with pytest.raises(ManagedError, match="marked"):
        await one.cycle(ref)
    seed.client("secretsmanager", REGION).restore_secret(SecretId=ref.secret_name)
    CLOCK.advance(LEASE)
    assert await one.cycle(ref) == "rotated"


def foreign_secret(ref: UserRef, password: str) -> str:
    """A secret under the documented name that somebody else made (no managed-by tag),
    holding JSON in fleetgate's shape; its version id."""
    value = json.dumps({"username": ref.user, "password": password, "user_arn": ref.user_arn})
    reply = seed.client("secretsmanager", REGION).create_secret(
        Name=ref.secret_name, SecretString=value, Tags=[{"Key": "team", "Value": "theirs"}]
    )
    return str(reply["VersionId"])


def untouched(name: str, version: str, password: str) -> None:
    described = seed.client("secretsmanager", REGION).describe_secret(SecretId=name)
    assert "DeletedDate" not in described
    assert versions(name) == [version]
    assert secret(name, "AWSCURRENT")["password"] == password


async def test_a_secret_fleetgate_did_not_create_is_never_changed_or_deleted(
    aws: MotoServer, lease_bus: Bus
) -> None:
    ref = ref_of("x", make_user("x"))
    theirs = "somebody-elses-password-0123456789"
    version = foreign_secret(ref, theirs)
    one = rotator(lease_bus, "h1")
    with pytest.raises(ManagedError, match="did not create it"):
        await one.cycle(ref)
    assert await record(lease_bus, ref)  # the lease record the agent wrote first
    untouched(ref.secret_name, version, theirs)
    assert USER_PASSWORDS[(ACCOUNT, REGION, "x")] != (theirs,)
    # the agents stopped, the lease passed: the sweep (agents' and the CLI's) leaves it
    later = CLOCK.now + 3 * LEASE
    verdicts = await sweep(lease_bus, IamAuth(), grace=0, now=later, recovery_days=None)
    assert [(v.record.user, v.action) for v in verdicts] == [("x", KEPT)]
    untouched(ref.secret_name, version, theirs)
    assert await leases.read(lease_bus, subjects.LEASES_BUCKET, ref.key, ManagedUser) is None
    assert await sweep(lease_bus, IamAuth(), grace=0, now=later) == []
    # and asked directly, the AWS layer refuses to write or delete it
    managed = ManagedAws(IamAuth(), REGION)
    with pytest.raises(NotOurs):
        await managed.delete_secret(ref.secret_name, recovery_days=None)
    with pytest.raises(NotOurs):
        await managed.put_secret(ref.secret_name, "{}", token=request_token(ref.secret_name, "x"))
    untouched(ref.secret_name, version, theirs)


async def test_a_secret_whose_tag_was_removed_is_not_rotated(
    aws: MotoServer, lease_bus: Bus
) -> None:
    ref = ref_of("app", make_user("app"))
    one = rotator(lease_bus, "h1")
    assert await one.cycle(ref) == "set-up"
    current = secret(ref.secret_name, "AWSCURRENT")
    seed.client("secretsmanager", REGION).untag_resource(
        SecretId=ref.secret_name, TagKeys=[MANAGED_BY_TAG]
    )
    CLOCK.advance(INTERVAL)
    with pytest.raises(NotOurs):
        await one.cycle(ref)  # rotation due, but the secret is no longer fleetgate's
    untouched(ref.secret_name, current["version"], current["password"])


class CreatedMeanwhile(ManagedAws):
    """Somebody else creates the secret under the documented name (no managed-by tag)
    just before the agent's CreateSecret: the agent found none a moment before."""

    def __init__(self, ref: UserRef, password: str) -> None:
        super().__init__(IamAuth(), REGION)
        self.ref = ref
        self.password = password
        self.version = ""

    async def create_secret(
        self, name: str, value: str, *, token: str, tags: dict[str, str], kms_key_id: str | None
    ) -> str:
        if not self.version:
            self.version = await asyncio.to_thread(foreign_secret, self.ref, self.password)
        return await super().create_secret(
            name, value, token=token, tags=tags, kms_key_id=kms_key_id
        )


@pytest.mark.parametrize("when", ["after-the-lease", "before-create-secret"])
async def test_a_secret_made_by_somebody_else_during_set_up_is_never_used(
    aws: MotoServer, lease_bus: Bus, when: str
) -> None:
    """The secret appears while an agent sets the user up (after it took the lease, or
    between finding no secret and its CreateSecret): its password is never put on the
    MemoryDB user, and the secret is neither changed nor tagged, now or later."""
    ref = ref_of("x", make_user("x"))
    before = USER_PASSWORDS[(ACCOUNT, REGION, "x")]
    theirs = "somebody-elses-password-0123456789"
    made = CreatedMeanwhile(ref, theirs)
    appeared: list[str] = []

    async def at_lease(step: Step, _: UserRef) -> None:
        if step == "leased" and not appeared:
            appeared.append(await asyncio.to_thread(foreign_secret, ref, theirs))

    if when == "after-the-lease":
        agent = rotator(lease_bus, "h1", hook=at_lease)
    else:
        agent = Rotator(
            lease_bus,
            "h1",
            lambda _: made,
            RotationSettings(interval=INTERVAL, jitter=0.0, lease=LEASE),
            clock=CLOCK,
        )
    with pytest.raises(NotOurs):
        await agent.cycle(ref)
    version = appeared[0] if appeared else made.version
    assert version
    untouched(ref.secret_name, version, theirs)
    tags = seed.client("secretsmanager", REGION).describe_secret(SecretId=ref.secret_name)["Tags"]
    assert {t["Key"] for t in tags} == {"team"}
    assert USER_PASSWORDS[(ACCOUNT, REGION, "x")] == before
    # once the lease has passed, the next cycle (any agent) leaves it alone as well
    CLOCK.advance(LEASE)
    with pytest.raises(NotOurs):
        await rotator(lease_bus, "h2").cycle(ref)
    untouched(ref.secret_name, version, theirs)
    assert USER_PASSWORDS[(ACCOUNT, REGION, "x")] == before


async def test_cleanup_prints_its_verdicts_as_json(
    aws: MotoServer, lease_bus: Bus, nats_server: NatsServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """``managed cleanup --format json``: one object per managed user with its verdict,
    the same verdicts the text lines show; no secret is touched with --dry-run."""
    ref = ref_of("app", make_user("app"))
    hour_ago = time.time() - 3600  # set up an hour ago (CLOCK is other tests' time)
    auth = IamAuth()
    one = Rotator(
        lease_bus,
        "h1",
        lambda ref: ManagedAws(auth, ref.region, ref.roles),
        RotationSettings(interval=INTERVAL, jitter=0.0, lease=LEASE),
        clock=lambda: hour_ago,
    )
    assert await one.cycle(ref) == "set-up"
    argv = ["managed", "cleanup", "--grace", "0", "--dry-run", "--nats", nats_server.url]
    assert await asyncio.to_thread(main, [*argv, "--format", "json"]) == 0
    [verdict] = json.loads(capsys.readouterr().out)
    assert verdict == {
        "key": ref.key,
        "user": "app",
        "region": REGION,
        "account": ACCOUNT,
        "secret": ref.secret_name,
        "databases": verdict["databases"],
        "action": verdict["action"],
    }
    assert verdict["action"] == "would delete"
    assert await asyncio.to_thread(main, argv) == 0
    [line] = capsys.readouterr().out.splitlines()
    assert line.split() == ["app", REGION, *verdict["action"].split(), ref.secret_name]
    assert len(versions(ref.secret_name)) == 1  # a dry run deletes nothing
