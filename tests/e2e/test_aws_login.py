"""``fleetgate login --aws`` end to end: moto's STS (its real HTTP server), real
nats-server, the login service on loopback HTTPS, a CI-like process with moto
credentials, then ``db connect`` through a test agent to a real valkey-server; and every
refusal, answered with its reason (no traceback)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import botocore.auth
import botocore.session
import pytest
import redis.asyncio as aredis

from bus import Bus, subjects
from bus.access import Identity
from bus.audit import Login, read_events
from bus.server import NatsServer
from dbservice.access.awsid import SERVER_ID_HEADER, sign_identity_request
from dbservice.access.ca import cert_pem, key_pem, new_key
from dbservice.auth.admin import add_aws_rule, write_identity
from dbservice.auth.service import AuthConfig, start_service
from dbservice.route import RouteRefused
from sandbox.aws import MotoServer
from sandbox.valkeynode import ValkeyNode
from tests.kits.agent import running_agent
from tests.kits.common import assumed_role_env
from tests.kits.connect import StandInAgent, Tunnel, World, resource, world
from tests.kits.listener import (
    APP_PASSWORD,
    RawSession,
    add_acl_users,
    audit_events,
    make_fleet,
    static_db,
    wait_events,
)
from tests.kits.proxy import serve_single_node

ACC = "123456789012"
SERVER_ID = "fleetgate-test-auth"
DATABASES = {"dev-cache": resource("dev-cache", env="dev")}


@pytest.fixture(scope="module")
def valkey(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ValkeyNode]:
    yield from serve_single_node(tmp_path_factory.mktemp("valkey"))


@pytest.fixture
async def w(
    bus: Bus, tmp_path: Path, nats_server: NatsServer, aws: MotoServer
) -> AsyncIterator[World]:
    for db in DATABASES.values():
        await bus.put_resource(db)
    settings = {"server_id": SERVER_ID, "sts_endpoints": [aws.url]}
    async with world(bus, tmp_path, nats_server.url, aws=settings) as env:
        await add_aws_rule(bus, "ci-bot", [f"arn:aws:iam::{ACC}:role/ci-*"], ["dev"], ttl=1800)
        yield env


def assume(role: str, session: str = "job-42") -> dict[str, str]:
    """Credentials of an assumed role from moto's STS, as a CI job's environment has."""
    return assumed_role_env(role, session, ACC)


async def login_aws(w: World, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess[str]:
    """``fleetgate login --aws`` as its own process (a CI job)."""
    ca_file = str(w.tmp / "ca" / "ca.crt")
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "fleetgate", "login", "--aws", "--auth", w.auth,
         "--ca-file", ca_file, *extra],
        env=w.env(**env), capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


async def logins(w: World) -> list[Login]:
    await w.audit.flush(5)

    async def read() -> list[Login]:
        found = read_events(w.bus, subject=subjects.audit_filter("auth.login"))
        return [e async for e in found if isinstance(e, Login)]

    return await asyncio.wait_for(read(), 10)


async def test_a_ci_job_logs_in_with_its_role_and_connects(w: World, valkey: ValkeyNode) -> None:
    done = await login_aws(w, assume("ci-deploy"))
    assert done.returncode == 0, done.stderr
    arn = f"arn:aws:sts::{ACC}:assumed-role/ci-deploy/job-42"
    assert f"logged in as ci-bot with AWS identity {arn} (roles: dev)" in done.stdout
    status = await w.fleetgate("status", "--format", "json")
    doc = json.loads(status.stdout)
    assert (doc["user"], doc["kind"], doc["roles"], doc["aws_arn"]) == (
        "ci-bot",
        "bot",
        ["dev"],
        arn,
    )
    expires = dt.datetime.fromisoformat(doc["expires"])
    assert expires - dt.datetime.now(dt.UTC) <= dt.timedelta(seconds=1800)  # the rule's ttl

    [event] = [e for e in await logins(w) if e.method == "aws"]
    assert (event.user, event.principal, event.success) == ("ci-bot", arn, True)
    again = await login_aws(w, assume("ci-deploy"), "--format", "json")
    assert again.returncode == 0, again.stderr
    logged = json.loads(again.stdout)
    assert {k: logged[k] for k in ("user", "kind", "roles", "aws_arn")} == {
        k: doc[k] for k in ("user", "kind", "roles", "aws_arn")
    }
    assert 0 < logged["ttl"] <= 1800 and logged["auth"] == doc["auth"]

    agent = await StandInAgent(w.bus, w.ca, w.tmp / "agent-1", DATABASES, valkey.port).start()
    try:
        await agent.announce("dev-cache")
        listed = await w.fleetgate("db", "ls", "--format", "json")
        assert [d["name"] for d in json.loads(listed.stdout)] == ["dev-cache"], listed.stderr
        tunnel = await Tunnel.start(w, "dev-cache", "app")
        try:
            client = aredis.Redis(host="127.0.0.1", port=tunnel.port, socket_timeout=5)
            try:
                assert await client.set("aws-login", "works")
                assert await client.get("aws-login") == b"works"
            finally:
                await client.aclose()
        finally:
            await tunnel.stop()
        assert agent.routes == [("ci-bot", "dev-cache", "app")]
    finally:
        await agent.stop()


async def test_an_arn_no_rule_admits_is_refused_with_the_reason(w: World) -> None:
    done = await login_aws(w, assume("web-frontend"))
    assert done.returncode == 2  # as a refused password login
    assert "Traceback" not in done.stderr
    principal = f"arn:aws:iam::{ACC}:role/web-frontend"
    assert done.stderr.startswith("fleetgate: error: login failed: AWS identity refused: no rule")
    assert principal in done.stderr and "fleetgate users add-aws" in done.stderr
    assert not (w.home / "identity" / "cert.pem").exists()
    [event] = await logins(w)
    assert not event.success and event.principal.endswith("assumed-role/web-frontend/job-42")
    # --role asks for one role of the rule; one it does not grant is refused
    granted = await login_aws(w, assume("ci-x"), "--role", "dev")
    assert granted.returncode == 0, granted.stderr
    refused = await login_aws(w, assume("ci-x"), "--role", "admin")
    assert "role 'admin' is not granted" in refused.stderr and refused.returncode == 2


async def test_no_credentials_and_a_service_without_aws_logins_say_so(
    w: World, bus: Bus, tmp_path: Path, nats_server: NatsServer
) -> None:
    empty = {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_SESSION_TOKEN": ""}
    done = await login_aws(w, empty)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "no AWS credentials found" in done.stderr
    config = AuthConfig.model_validate({"listen": "127.0.0.1:0", "ca_dir": str(tmp_path / "ca")})
    plain = await start_service(config, bus=bus, ca=w.ca, audit=w.audit)
    try:
        off = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "fleetgate", "login", "--aws", "--auth",
             f"127.0.0.1:{plain.port}", "--ca-file", str(tmp_path / "ca" / "ca.crt")],
            env=w.env(**assume("ci-deploy")), capture_output=True, text=True, timeout=60,
            check=False,
        )  # fmt: skip
    finally:
        await plain.close()
    assert off.returncode == 2 and "does not accept AWS identities" in off.stderr


# -- refusals of the signed request, at the HTTP API ------------------------------------


def sign(server_id: str = SERVER_ID) -> dict[str, Any]:
    """A proof signed in this process with credentials of the role ci-deploy (moto's)."""
    creds = assume("ci-deploy")
    session = botocore.session.Session()
    session.set_credentials(
        creds["AWS_ACCESS_KEY_ID"], creds["AWS_SECRET_ACCESS_KEY"], creds["AWS_SESSION_TOKEN"]
    )
    return sign_identity_request(session, server_id)


async def post(w: World, proof: dict[str, Any], *, port: int | None = None) -> tuple[int, str]:
    from tests.integration.test_access_login import CSR

    tls = ssl.create_default_context(cafile=str(w.tmp / "ca" / "ca.crt"))
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls)) as http,
        http.post(
            f"https://127.0.0.1:{port or w.service.port}/v1/login/aws",
            json={"proof": proof, "csr": CSR},
        ) as resp,
    ):
        answer = await resp.json()
        return resp.status, str(answer.get("error", ""))


async def test_a_signed_request_works_once(w: World) -> None:
    proof = sign()
    assert (await post(w, proof))[0] == 200
    status, error = await post(w, proof)
    assert status == 401
    assert error == (
        "AWS identity refused: this signed request was used before: sign a new one for each login"
    )
    assert (await post(w, sign()))[0] == 200  # a new signature is a new login


async def test_two_instances_racing_with_one_signed_request_let_one_in(w: World, bus: Bus) -> None:
    """Used signatures are shared through NATS: the same request sent to two instances
    behind one name at once logs in once."""
    config = w.service.service.config
    other = await start_service(
        config.model_copy(update={"listen": "127.0.0.1:0"}), bus=bus, ca=w.ca, audit=w.audit
    )
    try:
        for _ in range(3):
            proof = sign()
            answers = await asyncio.gather(post(w, proof), post(w, proof, port=other.port))
            assert sorted(status for status, _ in answers) == [200, 401]
    finally:
        await other.close()


async def test_old_dates_other_services_and_other_urls_are_refused(
    w: World, aws: MotoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_now = botocore.auth.get_current_datetime
    monkeypatch.setattr(
        botocore.auth, "get_current_datetime", lambda: real_now() - dt.timedelta(minutes=6)
    )
    status, error = await post(w, sign())
    assert status == 401 and "old; it must be signed within 300s" in error
    monkeypatch.setattr(botocore.auth, "get_current_datetime", real_now)

    status, error = await post(w, sign("another-service"))
    assert status == 401 and "signed for another service" in error
    bare = sign()
    del bare["headers"][SERVER_ID_HEADER]
    status, error = await post(w, bare)
    assert status == 401 and "x-fleetgate-server-id" in error
    for url in ("https://attacker.example/", aws.url.replace("127.0.0.1", "localhost")):
        status, error = await post(w, {**sign(), "url": url})
        assert status == 401 and "is not an STS endpoint this service accepts" in error
    assert (await post(w, sign()))[0] == 200  # the same credentials, signed right

    reasons = [e.reason for e in await logins(w) if not e.success]
    assert len(reasons) == 5 and any("signed for another service" in r for r in reasons)


async def test_the_agents_audit_events_name_the_aws_principal(
    bus: Bus, tmp_path: Path, nats_server: NatsServer, valkey: ValkeyNode
) -> None:
    """Through a real agent: a session of an identity from ``login --aws`` (its
    certificate carries the ARN) is audited with ``principal``, its refusals too; a
    person's session without."""
    await add_acl_users(valkey)
    fleet = await make_fleet(bus, tmp_path, nats_server.url)
    arn = f"arn:aws:sts::{ACC}:assumed-role/ci-deploy/job-42"
    key = new_key()
    identity = Identity(user="ci-bot", roles=("dev",), kind="bot", aws_arn=arn)
    cert = fleet.ca.issue_client(key.public_key(), identity, 600)
    ci = tmp_path / "ids" / "ci-bot"
    write_identity(ci, key_pem(key), cert_pem(cert), fleet.ca.pem)
    config = fleet.agent("agent-1", [static_db("dev-cache", valkey.port, env="dev")])
    async with running_agent(config, fleet.nats_url) as running:
        assert running.listener is not None
        port = running.listener.port
        session = await RawSession.open(port, ci, fleet.ca.pem, "dev-cache", "app")
        assert await session.call("AUTH", "app", APP_PASSWORD) == b"+OK"
        assert await session.call("GET", "k") == b"$-1"
        session.close()
        with pytest.raises(RouteRefused, match="admin"):
            await RawSession.open(port, ci, fleet.ca.pem, "dev-cache", "admin")
        alice = await RawSession.open(
            port, fleet.identity("alice", ["dev"]), fleet.ca.pem, "dev-cache", "app"
        )
        alice.close()
        await wait_events(bus, 2, "session ends", type="db.session.end")

    events = await audit_events(bus)
    mine = [(e.type, e.success, e.principal) for e in events if e.user == "ci-bot"]
    assert ("db.session.start", True, arn) in mine
    assert ("db.session.query", True, arn) in mine
    assert ("db.session.end", True, arn) in mine
    assert ("db.session.start", False, arn) in mine  # the refused db user
    assert {e.principal for e in events if e.user == "alice"} == {""}


async def test_admins_manage_aws_rules_from_the_command_line(w: World) -> None:
    added = await w.fleetgate(
        "users", "add-aws", "deployer", "--arn", f"arn:aws:iam::{ACC}:role/deploy-*",
        "--arn", f"arn:aws:sts::{ACC}:assumed-role/ops/*", "--account", ACC,
        "--roles", "dev", "--ttl", "15m",
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    assert "log in as deployer with roles dev (fleetgate login --aws)" in added.stdout
    listed = await w.fleetgate("users", "ls-aws", "--format", "json")
    rules = {r["name"]: r for r in json.loads(listed.stdout)}
    assert sorted(rules) == ["ci-bot", "deployer"]
    assert (rules["deployer"]["account"], rules["deployer"]["ttl"]) == (ACC, 900.0)
    table = await w.fleetgate("users", "ls-aws")
    assert "deploy-*" in table.stdout and "15m" in table.stdout

    again = await w.fleetgate("users", "add-aws", "deployer", "--arn", "arn:aws:iam::1:role/x",
                              "--roles", "dev")  # fmt: skip
    assert again.returncode == 2 and "exists already" in again.stderr
    for bad, problem in (
        (["--arn", "role/ci-*", "--roles", "dev"], "is not an ARN pattern"),
        (["--arn", "arn:aws:iam::1:role/x", "--roles", "nope"], "unknown role(s): nope"),
        (["--arn", "arn:aws:iam::1:role/x", "--roles", "dev", "--account", "x"], "twelve digits"),
    ):
        done = await w.fleetgate("users", "add-aws", "other", *bad)
        assert done.returncode == 2 and problem in done.stderr, done.stderr
        assert "Traceback" not in done.stderr

    removed = await w.fleetgate("users", "rm-aws", "deployer")
    assert removed.returncode == 0, removed.stderr
    gone = await w.fleetgate("users", "rm-aws", "deployer")
    assert gone.returncode == 2 and "no AWS rule 'deployer'" in gone.stderr
