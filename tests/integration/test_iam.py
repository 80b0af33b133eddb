"""MemoryDB IAM login on real parts: moto's server as AWS (users, clusters, STS), the
stand-in checking tokens by recomputing SigV4, and redis-py logging in with our tokens."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio
import redis.exceptions
from aiobotocore.config import AioConfig
from botocore.credentials import ReadOnlyCredentials

from bus.schemas import AWSSpec, DatabaseResource, DatabaseSpec, MemoryDBSpec, Metadata
from dbservice.upstream import auth as wire
from dbservice.upstream import iam
from dbservice.upstream.iam import IamAuth, IamTarget, Role
from sandbox.aws import ACL_MEMBERS, MotoServer, assumed_role
from sandbox.iamfront import IamFront, MemoryDBLogin, check_token
from sandbox.memorydb import MemoryDBStandin, StandinConfig
from tests.kits import seed as seed
from tests.kits.common import NO_RETRY_ASYNC

pytestmark = pytest.mark.timeout(60)

REGION = "us-east-1"
ACCOUNT = "123456789012"
CLUSTER = "Orders-Prod"
ACL = "orders-acl"
TIMEOUTS: dict[str, Any] = {"socket_timeout": 5.0, "socket_connect_timeout": 5.0}
SANDBOX = ReadOnlyCredentials("AKIAFLEETGATESANDBOX", "sandbox-secret-key", None)


def resource(
    *,
    cluster: str = CLUSTER,
    role: str | None = None,
    external_id: str | None = None,
    engine_version: str = "7.1",
    iam_users: tuple[str, ...] | None = None,
    tls: bool = True,
    acl: str = ACL,
) -> DatabaseResource:
    return DatabaseResource(
        metadata=Metadata(name=f"{cluster.lower()}-db"),
        spec=DatabaseSpec(
            uri=f"clustercfg.{cluster.lower()}.abc.memorydb.{REGION}.amazonaws.com:6379",
            aws=AWSSpec(
                region=REGION,
                account_id=ACCOUNT,
                assume_role_arn=role,
                external_id=external_id,
                memorydb=MemoryDBSpec(
                    cluster_name=cluster,
                    acl_name=acl,
                    tls_enabled=tls,
                    engine_version=engine_version,
                    iam_users=iam_users,
                ),
            ),
        ),
    )


def create_user(name: str, kind: str, passwords: list[str] | None = None) -> None:
    mode: dict[str, Any] = {"Type": kind}
    if passwords:
        mode["Passwords"] = passwords
    seed.client("memorydb", REGION).create_user(
        UserName=name, AuthenticationMode=mode, AccessString="on ~* &* +@all"
    )
    ACL_MEMBERS.setdefault((ACCOUNT, REGION, name), set()).add(ACL)


@pytest.fixture
async def standin(
    tmp_path: Path, aws: MotoServer
) -> AsyncIterator[tuple[MemoryDBStandin, MemoryDBLogin]]:
    """A one-shard stand-in whose fronts check IAM logins, with users from moto."""
    seed.cluster(REGION, CLUSTER, acl=ACL, engine_version="7.1")
    create_user("alice", "iam")
    create_user("bob", "password", ["bob-password-0123456789"])
    login = MemoryDBLogin(cluster=CLUSTER, region=REGION)
    login.set_password("bob", "bob-password-0123456789")
    config = StandinConfig(dir=tmp_path / "db", front_factory=IamFront.factory(login))
    async with MemoryDBStandin(config) as standin:
        await login.sync_from_aws(standin.nodes)
        yield standin, login


def client(standin: MemoryDBStandin, user: str, password: str, **kw: Any) -> redis.asyncio.Redis:
    """redis-py to the stand-in; a refused login is tried once (:data:`NO_RETRY_ASYNC`)."""
    host, port = standin.endpoint
    return redis.asyncio.Redis(
        host=host,
        port=port,
        ssl=True,
        ssl_ca_certs=str(standin.ca_file),
        username=user,
        password=password,
        retry=NO_RETRY_ASYNC,
        **TIMEOUTS,
        **kw,
    )


# -- the token ------------------------------------------------------------------------


def test_token_shape() -> None:
    at = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
    token = iam.presign_token(SANDBOX, cluster=CLUSTER, user="alice", region=REGION, at=at)
    assert token.startswith(
        "orders-prod/?Action=connect&User=alice&X-Amz-Algorithm=AWS4-HMAC-SHA256"
    )
    assert "X-Amz-Expires=900" in token
    assert "%2F20261125%2Fus-east-1%2Fmemorydb%2Faws4_request" in token
    assert "X-Amz-SignedHeaders=host" in token
    assert not token.startswith("http")
    secret = {"AKIAFLEETGATESANDBOX": "sandbox-secret-key"}.get
    ok = dict(user="alice", cluster=CLUSTER, region=REGION, secret_of=secret)
    assert check_token(token, **ok, now=at + timedelta(seconds=899)) is None
    assert check_token(token, **ok, now=at + timedelta(seconds=901)) == "expired"
    assert check_token(token, **{**ok, "user": "bob"}, now=at) == "Action/User do not match"
    assert "host" in str(check_token(token, **{**ok, "cluster": "other"}, now=at))
    assert "scope" in str(check_token(token, **{**ok, "region": "eu-west-1"}, now=at))
    forged = token[:-4] + ("0000" if not token.endswith("0000") else "1111")
    assert check_token(forged, **ok, now=at) == "signature does not match"


def test_token_with_session_credentials_verifies() -> None:
    creds = ReadOnlyCredentials("ASIAEXAMPLE", "secret/with+chars", "session/token+=")
    at = datetime.now(UTC)
    token = iam.presign_token(creds, cluster="c1", user="u-1", region="eu-west-1", at=at)
    assert "X-Amz-Security-Token=session%2Ftoken%2B%3D" in token
    assert (
        check_token(
            token,
            user="u-1",
            cluster="c1",
            region="eu-west-1",
            secret_of={"ASIAEXAMPLE": "secret/with+chars"}.get,
        )
        is None
    )


def test_engine_version_gate() -> None:
    assert IamTarget.of(resource(engine_version="7.1")).engine_supports_iam
    assert IamTarget.of(resource(engine_version="v7.0.7")).engine_supports_iam
    assert IamTarget.of(resource(engine_version="")).engine_supports_iam
    assert not IamTarget.of(resource(engine_version="6.2")).engine_supports_iam


def test_role_chain_order() -> None:
    target = IamTarget.of(
        resource(role=f"arn:aws:iam::{ACCOUNT}:role/db", external_id="x"),
        matcher_role=Role(f"arn:aws:iam::{ACCOUNT}:role/matcher"),
    )
    assert [r.arn.rsplit("/", 1)[1] for r in target.roles] == ["matcher", "db"]
    assert target.roles[1].external_id == "x"
    assert target.cluster_arn == f"arn:aws:memorydb:{REGION}:{ACCOUNT}:cluster/{CLUSTER}"


# -- logging in through the stand-in -----------------------------------------------


async def test_token_logs_in_and_password_user_too(
    standin: tuple[MemoryDBStandin, MemoryDBLogin],
) -> None:
    db, login = standin
    auth = IamAuth()
    target = IamTarget.of(resource())
    assert await auth.is_iam_user(target, "alice")
    assert not await auth.is_iam_user(target, "bob")
    token = await auth.token(target, "alice")
    for protocol in (2, 3):
        alice = client(db, "alice", token, protocol=protocol)
        try:
            assert await alice.set("k", "v")
            assert await alice.acl_whoami() in ("alice", b"alice")
        finally:
            await alice.aclose()
    bob = client(db, "bob", "bob-password-0123456789")
    try:
        assert await bob.acl_whoami() in ("bob", b"bob")
    finally:
        await bob.aclose()
    assert login.accepted == 2


async def test_wrong_and_expired_tokens_refused(
    standin: tuple[MemoryDBStandin, MemoryDBLogin],
) -> None:
    db, login = standin
    old = iam.presign_token(
        SANDBOX, cluster=CLUSTER, user="alice", region=REGION,
        at=datetime.now(UTC) - timedelta(seconds=1000),
    )  # fmt: skip
    other_cluster = iam.presign_token(SANDBOX, cluster="other", user="alice", region=REGION)
    as_bob = iam.presign_token(SANDBOX, cluster=CLUSTER, user="bob", region=REGION)
    for user, token in (
        ("alice", old),
        ("alice", other_cluster),
        ("alice", "junk"),
        ("bob", as_bob),
    ):
        c = client(db, user, token)
        try:
            with pytest.raises(redis.exceptions.AuthenticationError) as info:
                await c.ping()
            assert "invalid username-password pair or user is disabled" in str(info.value)
        finally:
            await c.aclose()
    assert "expired" in login.refusals
    assert login.accepted == 0


async def test_login_on_raw_streams_and_reauth_mid_connection(
    standin: tuple[MemoryDBStandin, MemoryDBLogin],
) -> None:
    db, login = standin
    auth = IamAuth()
    target = IamTarget.of(resource())
    reader, writer = await asyncio.open_connection(
        *db.endpoint, ssl=_ssl(db), server_hostname="127.0.0.1"
    )
    try:
        await asyncio.wait_for(wire.login(auth, target, "alice", reader, writer), 10)
        # a later AUTH on the same connection (the 12-hour renewal) is checked too
        fresh = iam.presign_token(SANDBOX, cluster=CLUSTER, user="alice", region=REGION)
        assert await wire.send_auth(reader, writer, "alice", fresh) == b"+OK"
        assert (await wire.send_auth(reader, writer, "alice", "junk")).startswith(b"-WRONGPASS")
    finally:
        writer.transport.abort()
    assert login.accepted == 2


def _ssl(db: MemoryDBStandin) -> Any:
    import ssl

    return ssl.create_default_context(cafile=str(db.ca_file))


# -- caching --------------------------------------------------------------------------


async def test_caches_across_many_connections(
    standin: tuple[MemoryDBStandin, MemoryDBLogin],
) -> None:
    db, login = standin
    role = f"arn:aws:iam::{ACCOUNT}:role/fleetgate-db"
    auth = IamAuth()
    target = IamTarget.of(
        resource(role=role, external_id="ext-1"),
        matcher_role=Role(f"arn:aws:iam::{ACCOUNT}:role/fleetgate-matcher"),
    )
    for _ in range(20):
        assert await auth.is_iam_user(target, "alice")
        token = await auth.token(target, "alice")
        c = client(db, "alice", token)
        try:
            assert await c.ping()
        finally:
            await c.aclose()
    assert auth.calls == {"sts:AssumeRole": 2, "memorydb:DescribeUsers": 1}
    assert auth.tokens_signed == 1
    # the token is signed by the database's role, assumed with the matcher role's keys
    key_id = token.split("X-Amz-Credential=", 1)[1].split("%2F", 1)[0]
    signer = assumed_role(key_id)
    assert signer is not None
    assert signer.role_arn == role and signer.external_id == "ext-1"
    assert login.accepted == 20


async def test_token_renewed_five_minutes_before_expiry(aws: MotoServer) -> None:
    now = [1_000_000.0]
    auth = IamAuth(clock=lambda: now[0])
    target = IamTarget.of(resource())
    first = await auth.token(target, "alice")
    now[0] += 599
    assert await auth.token(target, "alice") == first
    now[0] += 2
    assert await auth.token(target, "alice") != first
    assert auth.tokens_signed == 2
    # another user, cluster or role chain never shares a token
    await auth.token(target, "carol")
    await auth.token(IamTarget.of(resource(cluster="other")), "alice")
    assert auth.tokens_signed == 4


async def test_registry_iam_users_skip_describe_users(aws: MotoServer) -> None:
    auth = IamAuth()
    target = IamTarget.of(resource(iam_users=("alice",)))
    assert await auth.is_iam_user(target, "alice")
    assert not await auth.is_iam_user(target, "bob")
    assert not await auth.is_iam_user(IamTarget.of(resource(engine_version="6.2")), "alice")
    assert auth.calls == {}


async def test_user_answer_cached_for_its_ttl(aws: MotoServer) -> None:
    create_user("alice", "iam")
    now = [1_000_000.0]
    auth = IamAuth(clock=lambda: now[0])
    target = IamTarget.of(resource())
    for _ in range(5):
        assert await auth.is_iam_user(target, "alice")
    now[0] += 301
    assert await auth.is_iam_user(target, "alice")
    assert auth.calls == {"memorydb:DescribeUsers": 2}


# -- failures, each one line ------------------------------------------------------


async def test_no_credentials(aws: MotoServer, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    auth = IamAuth()
    with pytest.raises(iam.NoCredentials) as info:
        await auth.token(IamTarget.of(resource()), "alice")
    message = str(info.value)
    assert message.startswith("no valid providers in chain: looked in the environment")
    assert "instance metadata" in message and "\n" not in message


async def test_tls_off_refused_before_any_token(aws: MotoServer) -> None:
    auth = IamAuth()
    with pytest.raises(iam.TlsRequired) as info:
        await auth.check_login(IamTarget.of(resource(tls=False)), "alice")
    assert "in-transit encryption (TLS)" in str(info.value)
    assert auth.tokens_signed == 0


async def test_user_not_in_acl(aws: MotoServer) -> None:
    create_user("alice", "iam")
    ACL_MEMBERS[(ACCOUNT, REGION, "alice")] = {"some-other-acl"}
    with pytest.raises(iam.UserNotInAcl) as info:
        await IamAuth().check_login(IamTarget.of(resource()), "alice")
    assert str(info.value) == (
        "MemoryDB user 'alice' is not in ACL 'orders-acl' of cluster Orders-Prod: add it "
        "(aws memorydb update-acl --acl-name orders-acl --user-names-to-add alice)"
    )


async def test_refusals_diagnosed(standin: tuple[MemoryDBStandin, MemoryDBLogin]) -> None:
    db, login = standin
    auth = IamAuth()
    target = IamTarget.of(resource())

    async def attempt(user: str) -> iam.IamError:
        reader, writer = await asyncio.open_connection(
            *db.endpoint, ssl=_ssl(db), server_hostname="127.0.0.1"
        )
        try:
            with pytest.raises(iam.IamError) as info:
                await asyncio.wait_for(wire.login(auth, target, user, reader, writer), 10)
            return info.value
        finally:
            writer.transport.abort()

    # memorydb:Connect missing: the policy with both ARNs
    login.allow_connect = lambda key, user: False
    denied = await attempt("alice")
    assert isinstance(denied, iam.ConnectDenied)
    text = str(denied)
    assert "\n" not in text and "memorydb:Connect" in text
    policy = json.loads(text[text.index("{") :])
    assert policy["Statement"][0]["Resource"] == [
        f"arn:aws:memorydb:{REGION}:{ACCOUNT}:cluster/{CLUSTER}",
        f"arn:aws:memorydb:{REGION}:{ACCOUNT}:user/alice",
    ]
    login.allow_connect = lambda key, user: True
    # the user was turned into a password user since the answer was cached
    seed.client("memorydb", REGION).update_user(
        UserName="alice", AuthenticationMode={"Type": "password", "Passwords": ["x" * 16]}
    )
    await login.sync_from_aws(db.nodes)
    not_iam = await attempt("alice")
    assert isinstance(not_iam, iam.IamNotEnabled)
    assert "authentication type is password" in str(not_iam)
    # removed from the ACL
    seed.client("memorydb", REGION).update_user(
        UserName="alice", AuthenticationMode={"Type": "iam"}
    )
    await login.sync_from_aws(db.nodes)
    ACL_MEMBERS[(ACCOUNT, REGION, "alice")] = {"another-acl"}
    login.allow_connect = lambda key, user: False  # MemoryDB refuses users outside the ACL
    auth.forget(target, "alice")
    gone = await attempt("alice")
    assert isinstance(gone, iam.UserNotInAcl)


async def test_describe_users_failing_is_a_warning_not_a_login_failure(
    aws: MotoServer, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens
    auth = IamAuth()
    auth.config = auth.config.merge(AioConfig(retries={"max_attempts": 1}, connect_timeout=1))
    target = IamTarget.of(resource())
    assert not await auth.is_iam_user(target, "alice")
    assert not await auth.is_iam_user(target, "alice")
    assert auth.calls == {"memorydb:DescribeUsers": 1}
    assert "cannot tell whether MemoryDB user alice" in caplog.text
