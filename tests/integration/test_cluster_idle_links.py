"""The cluster engine closes a session's connections to the cluster that go unused
(``ProxyTimeouts.link_idle``, the agent's ``listener.shard_idle_timeout``), the
configuration endpoint's included, and opens them again, logged in as before, when the
session next sends there; connections that carry state of their own (WATCH, MULTI,
CLIENT NO-TOUCH) are kept."""

from __future__ import annotations

import asyncio
import gc
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
import redis

from bus import Bus
from bus.schemas import AWSSpec, DatabaseResource, DatabaseSpec, MemoryDBSpec, Metadata, TLSSettings
from bus.server import NatsServer
from dbservice.access.ca import CertificateAuthority
from dbservice.agent.config import AgentConfig
from dbservice.auth.admin import sign_host
from dbservice.engine.cluster.resp import encode_command
from dbservice.engine.login import UpstreamLoginError
from dbservice.engine.proxy import Action, Hello, Streams
from dbservice.engine.proxy.settings import ProxyTimeouts
from sandbox.aws import MotoServer
from sandbox.memorydb import StandinConfig, ThreadedStandin
from tests.kits.agent import agent_config, running_agent, wait_until
from tests.kits.cluster import ClusterProxy
from tests.kits.listener import client, make_fleet, put_roles
from tests.kits.memorydb import config_endpoint, iam_cluster

T = TypeVar("T")

LINGER = 0.4
"""Seconds a shard connection may go unused here (checked every tenth of a second)."""


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedStandin]:
    config = StandinConfig(dir=tmp_path_factory.mktemp("idle-links"), shards=3, replicas=0)
    with ThreadedStandin(config) as running:
        yield running


@pytest.fixture
def proxy(standin: ThreadedStandin) -> Iterator[ClusterProxy]:
    with ClusterProxy(standin, timeouts=ProxyTimeouts(link_idle=LINGER)) as running:
        yield running


def _nodes(standin: ThreadedStandin) -> list[redis.Redis]:
    return [
        redis.Redis(host, port, ssl=True, ssl_ca_certs=str(standin.ca_file), socket_timeout=5)
        for host, port in standin.node_fronts
    ]


def _counts(proxy: ClusterProxy) -> tuple[int, int]:
    assert proxy.proxy is not None
    return proxy.proxy.dials, proxy.proxy.links_closed


def _wait_closed(proxy: ClusterProxy, at_least: int, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while _counts(proxy)[1] < at_least:
        assert time.monotonic() < deadline, f"links closed: {_counts(proxy)[1]}, want {at_least}"
        time.sleep(0.05)


KEYS = [b"key:%d" % i for i in range(30)]
"""Keys on every shard of three."""


def test_unused_shard_links_close_and_reopen_on_next_use(
    proxy: ClusterProxy, standin: ThreadedStandin
) -> None:
    with proxy.client() as client:
        for i, key in enumerate(KEYS):
            assert client.set(key, i)
        dials, closed = _counts(proxy)
        assert closed == 0 and dials >= 3  # the configuration endpoint, and the shards
        _wait_closed(proxy, dials)  # every one, the session's first too
        time.sleep(LINGER)
        assert _counts(proxy) == (dials, dials)
        assert client.ping()  # opens the configuration endpoint's again
        assert _counts(proxy) == (dials + 1, dials)
        # the next commands open the shard connections again, and see everything
        assert [client.get(k) for k in KEYS] == [b"%d" % i for i in range(30)]
        assert _counts(proxy)[0] >= dials + 3
        assert client.dbsize() == len(KEYS)


class AgentPassword:
    """The agent's own login (as for a managed password): ``AUTH`` as the db user on
    every new connection, before any client command."""

    password = b"pw-1"
    logins = 0

    async def login(self, upstream: Streams, *, db_user: str) -> bool:
        reader, writer = upstream
        writer.write(encode_command([b"AUTH", db_user.encode(), self.password]))
        line = await reader.readline()
        if line != b"+OK\r\n":
            raise UpstreamLoginError(line.decode().strip())
        AgentPassword.logins += 1
        return True

    def on_client_auth(self, username: bytes, password: bytes, hello: Hello | None) -> Action:
        return Action.forward()

    async def credentials(self, *, db_user: str) -> tuple[bytes, bytes] | None:
        return db_user.encode(), self.password


def test_reopened_links_log_in_as_the_session_did(standin: ThreadedStandin) -> None:
    """A connection opened again is logged in by the agent as the session's db user,
    never left as ``default``; a login the shard refuses then gives the client the
    error a first connection would."""
    nodes = _nodes(standin)
    try:
        for node in nodes:
            node.acl_setuser("alice", enabled=True, passwords=["+pw-1"], keys=["a*"],
                             commands=["+@all"], reset_keys=True)  # fmt: skip
        timeouts = ProxyTimeouts(link_idle=LINGER)
        kit = ClusterProxy(standin, timeouts=timeouts, login=AgentPassword, db_user="alice")
        with kit as proxy, proxy.client() as client:
            keys = [b"a%d" % i for i in range(30)]
            for key in keys:
                assert client.set(key, b"v")
            for i in range(30):
                with pytest.raises(redis.exceptions.NoPermissionError):
                    client.get(b"b%d" % i)
            logins, opened = AgentPassword.logins, _counts(proxy)[0]
            _wait_closed(proxy, opened)
            assert [client.get(k) for k in keys] == [b"v"] * 30
            assert AgentPassword.logins >= logins + 3  # the reopened ones logged in
            for i in range(30):  # alice on every shard, reopened or not
                with pytest.raises(redis.exceptions.NoPermissionError):
                    client.get(b"b%d" % i)
            assert client.acl_whoami() == "alice"
            for node in nodes:  # the shards now refuse the agent's password
                node.acl_setuser("alice", passwords=["-pw-1", "+pw-2"])
            _wait_closed(proxy, _counts(proxy)[0])
            errors = set()
            for key in keys:
                with pytest.raises(redis.exceptions.ResponseError) as info:
                    client.get(key)
                errors.add(str(info.value))
            assert len(errors) >= 3  # one per node, each named
            for error in errors:  # as for a connection opened the first time
                assert error.startswith("fleetgate: cannot log in to node "), errors
                assert "WRONGPASS" in error
    finally:
        for node in nodes:
            node.acl_deluser("alice")
            node.close()


def test_a_watch_keeps_its_connection(proxy: ClusterProxy, standin: ThreadedStandin) -> None:
    """WATCH lives on the shard's connection: closing it would lose the watch and let
    an EXEC run that the server must refuse."""
    with proxy.client() as client, proxy.client() as other:
        client.flushall()
        for key in KEYS:  # a link to every shard, the watched one among them
            client.set(key, b"0")
        with client.pipeline(transaction=True) as pipe:
            pipe.watch(KEYS[7])
            time.sleep(LINGER * 4)
            other.set(KEYS[7], b"changed")
            pipe.multi()
            pipe.set(KEYS[7], b"mine")
            with pytest.raises(redis.exceptions.WatchError):
                pipe.execute()
        assert client.get(KEYS[7]) == b"changed"


def test_client_no_touch_keeps_the_connections(proxy: ClusterProxy) -> None:
    """CLIENT NO-TOUCH is a mode of each connection, not replayed on a new one."""
    with proxy.client() as client:
        for key in KEYS:
            client.set(key, b"0")
        assert client.execute_command("CLIENT", "NO-TOUCH", "on") in (b"OK", "OK", True)
        dials = _counts(proxy)[0]
        time.sleep(LINGER * 4)
        assert [client.get(k) for k in KEYS] == [b"0"] * 30
        assert _counts(proxy) == (dials, 0)


def test_shard_idle_timeout_in_the_agent_config(tmp_path: Path) -> None:
    fleet_ca = CertificateAuthority.create()
    sign_host(fleet_ca, ["127.0.0.1"], 3600, tmp_path / "tls")
    listener = {
        "cert_file": str(tmp_path / "tls" / "cert.pem"),
        "key_file": str(tmp_path / "tls" / "key.pem"),
    }
    serve = {"resources": [{"labels": {"env": "x"}}]}

    def read(**extra: object) -> float | None:
        config = AgentConfig.model_validate(
            agent_config(tmp_path, "a", listener={**listener, **extra}, **serve)
        ).db_service.listener
        assert config is not None
        return config.shard_idle_timeout

    assert read() == 30.0
    assert read(shard_idle_timeout="2m") == 120.0
    assert read(shard_idle_timeout=None) is None
    with pytest.raises(ValueError) as info:
        read(shard_idle_timeout="500ms")
    assert "db_service.listener.shard_idle_timeout" in str(info.value)
    assert "1s or more" in str(info.value)


def _upstream_tls(hostnames: set[str]) -> int:
    """TLS connections of this process, alive as objects, to ``hostnames``."""
    gc.collect()
    return sum(
        1
        for o in gc.get_objects()
        if isinstance(o, ssl.SSLObject) and not o.server_side and o.server_hostname in hostnames
    )


async def test_the_agent_closes_an_idle_sessions_connections_and_frees_them(
    bus: Bus,
    nats_server: NatsServer,
    tmp_path: Path,
    aws: MotoServer,
) -> None:
    """Through the agent (IAM login, listener.shard_idle_timeout 1s): the session's
    connections to the cluster close once unused, none is kept alive by a reference
    (their TLS state is freed), and the next commands log in again, as the same user."""
    async with iam_cluster(tmp_path / "db", cluster="carts", acl="carts-acl", shards=3) as (
        db,
        login,
    ):
        fleet = await make_fleet(bus, tmp_path, nats_server.url)
        await put_roles(
            bus, carts={"allow": {"db_labels": {"env": "cluster"}, "db_users": ["alice"]}}
        )
        name = config_endpoint("carts")
        record = DatabaseResource(
            metadata=Metadata(name="carts", labels={"env": "cluster"}),
            spec=DatabaseSpec(
                uri=f"{name}:6379",
                tls=TLSSettings(mode="verify-full", ca_cert=db.ca_pem.decode()),
                aws=AWSSpec(
                    region="us-east-1",
                    account_id="123456789012",
                    memorydb=MemoryDBSpec(cluster_name="carts", acl_name="carts-acl"),
                ),
            ),
        )
        await bus.put_resource(record)
        host, port = db.endpoint
        config = fleet.agent(
            "agent-1", [], resources=[{"labels": {"env": "cluster"}}],
            host_aliases={f"{name}:6379": f"{host}:{port}"},
        )  # fmt: skip
        config["db_service"]["listener"]["shard_idle_timeout"] = "1s"
        hostnames = {name, *(h for h, _ in db.node_fronts)}
        erin = fleet.identity("erin", ["carts"])
        keys = [f"cart:{i}" for i in range(30)]
        async with running_agent(config, nats_server.url) as agent:
            assert agent.listener is not None
            r = client(agent.listener.port, erin, "carts", "alice")
            async with r:
                assert await r.mset({k: k for k in keys})
                # this client's, and the session's: the configuration endpoint's, 2 more
                active = _upstream_tls(hostnames)
                assert active == 4
                logins = login.accepted
                # every one of the session's closed, and not kept alive by a reference
                await wait_until(lambda: _upstream_tls(hostnames) == active - 3, 10, "closed")
                assert await r.mget(keys) == [k.encode() for k in keys]
                assert await r.acl_whoami() in ("alice", b"alice")
                assert login.accepted >= logins + 3  # each opened again with an IAM token


def test_nothing_to_renew_on_a_session_with_no_connection_open(proxy: ClusterProxy) -> None:
    """The agent's IAM renewal (``inject``) on a session whose connections all closed
    unused: done at once (each new connection logs in afresh), not refused for a retry
    every minute."""
    with proxy.client() as client:
        assert client.set(KEYS[0], b"v")
        _wait_closed(proxy, 1)
        time.sleep(LINGER)
        answers: list[bool] = []
        (session,) = _on_loop(proxy, lambda: list(proxy.proxy.live) if proxy.proxy else [])
        accepted = _on_loop(proxy, lambda: session.inject([b"PING"], answers.append))
        assert accepted and answers == [True]
        assert client.get(KEYS[0]) == b"v"


def _on_loop(proxy: ClusterProxy, call: Callable[[], T]) -> T:
    """Run ``call`` on the engine's loop (sessions are not thread-safe)."""

    async def run() -> T:
        return call()

    assert proxy._loop is not None
    return asyncio.run_coroutine_threadsafe(run(), proxy._loop).result(5)
