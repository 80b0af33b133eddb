"""The proxy engine against a real valkey-server, driven by real clients: redis-py
(sync and asyncio, RESP2 and RESP3), valkey-cli, and raw sockets for byte-exact cases."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Sequence

import pytest
import redis
import redis.asyncio as aredis

from dbservice.engine.proxy import Action, Hello, PassThroughHooks, ProxyLimits, ProxyTimeouts
from sandbox.valkeynode import ValkeyNode
from tests.kits import proxy as proxykit
from tests.kits.common import NO_RETRY
from tests.kits.proxy import RawClient, Recorder, ThreadedProxy, cmd

node, proxy = proxykit.node, proxykit.proxy  # the kit's fixtures, used by name

PROTOCOLS = [2, 3]


def client(proxy: ThreadedProxy, protocol: int = 2, **kwargs: object) -> redis.Redis:
    """redis-py through the proxy; a refusal is answered once (:data:`NO_RETRY`)."""
    return redis.Redis(
        port=proxy.port,
        protocol=protocol,
        socket_timeout=10,
        retry=NO_RETRY,
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_sync_commands_and_types(proxy: ThreadedProxy, protocol: int) -> None:
    r = client(proxy, protocol)
    assert r.ping()
    assert r.set("a", "1") and r.get("a") == b"1"
    assert r.incr("n") == 1
    r.hset("h", mapping={"f": "v", "g": "w"})
    assert r.hgetall("h") == {b"f": b"v", b"g": b"w"}
    r.zadd("z", {"m": 1.5})
    assert r.zscore("z", "m") == 1.5
    assert r.get("missing") is None
    with pytest.raises(redis.ResponseError):
        r.execute_command("NOSUCHCOMMAND")
    assert r.execute_command("ECHO", "still in step") == b"still in step"
    r.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_sync_pipeline_of_1000_keeps_order(proxy: ThreadedProxy, protocol: int) -> None:
    r = client(proxy, protocol)
    pipe = r.pipeline(transaction=False)
    for i in range(1000):
        pipe.set(f"k{i}", i)
        pipe.incr(f"k{i}")
        pipe.get(f"k{i}")
    results = pipe.execute()
    assert results[0::3] == [True] * 1000
    assert results[1::3] == [i + 1 for i in range(1000)]
    assert results[2::3] == [str(i + 1).encode() for i in range(1000)]
    r.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_async_pipelines_on_many_connections(proxy: ThreadedProxy, protocol: int) -> None:
    r = aredis.Redis(port=proxy.port, protocol=protocol)

    async def one(worker: int) -> None:
        pipe = r.pipeline(transaction=False)
        for i in range(1000):
            pipe.set(f"w{worker}:{i}", f"{worker}:{i}")
            pipe.get(f"w{worker}:{i}")
        results = await pipe.execute()
        assert results[1::2] == [f"{worker}:{i}".encode() for i in range(1000)]

    async with asyncio.timeout(30):
        await asyncio.gather(*(one(w) for w in range(8)))
    await r.aclose()


def test_refused_command_is_answered_in_its_turn(node: ValkeyNode) -> None:
    asyncio.run(node.command("FLUSHALL"))
    hooks = Recorder(refuse=["FLUSHALL"])
    with ThreadedProxy(node.port, hooks=lambda: hooks) as proxy:
        r = client(proxy)
        pipe = r.pipeline(transaction=False)
        pipe.set("a", "1")
        pipe.flushall()
        pipe.get("a")
        results = pipe.execute(raise_on_error=False)
        assert results[0] is True and results[2] == b"1"
        assert isinstance(results[1], redis.ResponseError)
        assert "refused: FLUSHALL" in str(results[1])
        r.close()
        stats = proxy.finished(1)[0]
    assert stats.refused == 1
    assert [name for name, _ in hooks.replies] == [name for name, _ in hooks.commands]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_multi_exec_watch(proxy: ThreadedProxy, protocol: int) -> None:
    r = client(proxy, protocol)
    other = client(proxy, protocol)
    r.set("balance", 10)
    with r.pipeline() as pipe:
        pipe.watch("balance")
        value = int(pipe.get("balance") or 0)
        pipe.multi()
        pipe.set("balance", value + 5)
        pipe.get("balance")
        assert pipe.execute() == [True, b"15"]
    with r.pipeline() as pipe:
        pipe.watch("balance")
        other.set("balance", 0)  # a concurrent write: EXEC must fail
        pipe.multi()
        pipe.set("balance", 99)
        with pytest.raises(redis.WatchError):
            pipe.execute()
    assert r.get("balance") == b"0"
    r.close()
    other.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_blocking_commands(proxy: ThreadedProxy, protocol: int) -> None:
    r = client(proxy, protocol)
    pusher = client(proxy, protocol)
    timer = threading.Timer(0.3, lambda: pusher.rpush("queue", "job"))
    timer.start()
    began = time.monotonic()
    assert tuple(r.blpop(["queue"], timeout=5) or ()) == (b"queue", b"job")
    assert time.monotonic() - began >= 0.25
    timer.join()
    entry = pusher.xadd("stream", {"f": "v"})
    timer = threading.Timer(0.3, lambda: pusher.xadd("stream", {"g": "w"}))
    timer.start()
    got = r.xread({"stream": entry}, block=5000)
    timer.join()
    messages = got[b"stream"][0] if isinstance(got, dict) else got[0][1]  # RESP3 / RESP2
    assert messages[0][1] == {b"g": b"w"}
    assert r.ping()  # still in step after blocking replies
    r.close()
    pusher.close()


def test_blpop_tuple(proxy: ThreadedProxy) -> None:
    r = client(proxy)
    r.rpush("q", "x")
    assert tuple(r.blpop(["q"], timeout=1) or ()) == (b"q", b"x")
    r.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_pubsub_both_ways(proxy: ThreadedProxy, protocol: int) -> None:
    r = client(proxy, protocol)
    publisher = client(proxy, protocol)
    ps = r.pubsub()
    ps.subscribe("news", "sport")
    ps.psubscribe("wea*")
    ps.ssubscribe("shard-ch")
    kinds = [ps.get_message(timeout=2)["type"] for _ in range(4)]  # type: ignore[index]
    assert sorted(kinds) == ["psubscribe", "ssubscribe", "subscribe", "subscribe"]
    assert publisher.publish("news", "hello") == 1
    assert publisher.publish("weather", "rain") == 1
    assert publisher.spublish("shard-ch", "sharded") == 1
    got = [ps.get_message(timeout=2) for _ in range(3)]
    assert [(m["type"], m["data"]) for m in got if m] == [
        ("message", b"hello"),
        ("pmessage", b"rain"),
        ("smessage", b"sharded"),
    ]
    ps.ping("are you there")
    pong = ps.get_message(timeout=2)
    assert pong is not None and pong["type"] == "pong"
    ps.unsubscribe("sport")
    msg = ps.get_message(timeout=2)
    assert msg is not None and msg["type"] == "unsubscribe" and msg["channel"] == b"sport"
    assert publisher.publish("news", "again") == 1
    msg = ps.get_message(timeout=2)
    assert msg is not None and msg["data"] == b"again"
    ps.unsubscribe()
    ps.punsubscribe()
    ps.sunsubscribe()
    kinds = [ps.get_message(timeout=2)["type"] for _ in range(3)]  # type: ignore[index]
    assert sorted(kinds) == ["punsubscribe", "sunsubscribe", "unsubscribe"]
    assert publisher.publish("news", "nobody") == 0
    ps.close()
    r.close()
    publisher.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_pubsub_counting_on_one_connection(node: ValkeyNode, protocol: int) -> None:
    """Subscribe, receive, ping, unsubscribe without arguments, then ordinary commands
    on the same connection: every reply still matches its command."""
    hooks = Recorder()
    with ThreadedProxy(node.port, hooks=lambda: hooks) as proxy:
        sub = RawClient(proxy.port)
        pub = RawClient(proxy.port)
        if protocol == 3:
            sub.send(cmd("HELLO", "3"))
            assert isinstance(sub.read(), dict)
        sub.send(cmd("SUBSCRIBE", "a", "b", "a") + cmd("PSUBSCRIBE", "p*"))
        for _ in range(4):
            frame = sub.read()
            items = frame[1] if protocol == 3 else frame
            assert items[0] in (b"subscribe", b"psubscribe")
        pub.send(cmd("PUBLISH", "a", "m1") + cmd("PUBLISH", "px", "m2"))
        assert pub.read() == 1 and pub.read() == 1
        sub.send(cmd("PING"))
        got = [sub.read() for _ in range(3)]
        unwrap = [g[1] if isinstance(g, tuple) else g for g in got]
        assert unwrap[0] == [b"message", b"a", b"m1"]
        assert unwrap[1] == [b"pmessage", b"p*", b"px", b"m2"]
        assert unwrap[2] in ("PONG", [b"pong", b""])
        sub.send(cmd("UNSUBSCRIBE") + cmd("PUNSUBSCRIBE") + cmd("UNSUBSCRIBE"))
        # two channels, one pattern, then "no channel": four confirmations
        frames = [sub.read() for _ in range(4)]
        unwrap = [f[1] if isinstance(f, tuple) else f for f in frames]
        assert [u[0] for u in unwrap] == [
            b"unsubscribe",
            b"unsubscribe",
            b"punsubscribe",
            b"unsubscribe",
        ]
        assert unwrap[-1][1] is None and unwrap[-1][2] == 0
        sub.send(cmd("SET", "x", "1") + cmd("GET", "x"))
        assert sub.read() == "OK" and sub.read() == b"1"
        sub.close()
        pub.close()
        proxy.finished(2)
    subscriber = [n for n, _ in hooks.replies]
    assert "UNSUBSCRIBE" in subscriber and subscriber[-2:] == ["SET", "GET"]
    assert len(hooks.replies) == len(hooks.commands)


async def test_resp3_push_with_asyncio(proxy: ThreadedProxy) -> None:
    r = aredis.Redis(port=proxy.port, protocol=3)
    ps = r.pubsub()
    async with asyncio.timeout(10):
        await ps.subscribe("ch")
        assert (await ps.get_message(timeout=2))["type"] == "subscribe"  # type: ignore[index]
        await r.publish("ch", "pushed")
        msg = await ps.get_message(timeout=2)
        assert msg is not None and msg["data"] == b"pushed"
        await ps.unsubscribe("ch")
        await ps.aclose()
    await r.aclose()


def test_client_tracking_push_is_not_a_reply(proxy: ThreadedProxy) -> None:
    raw = RawClient(proxy.port)
    writer = RawClient(proxy.port)
    raw.send(cmd("HELLO", "3") + cmd("CLIENT", "TRACKING", "ON") + cmd("GET", "t"))
    assert isinstance(raw.read(), dict) and raw.read() == "OK" and raw.read() is None
    writer.send(cmd("SET", "t", "2"))
    assert writer.read() == "OK"
    push = raw.read()
    assert push == ("push", [b"invalidate", [b"t"]])
    raw.send(cmd("GET", "t"))
    assert raw.read() == b"2"
    raw.close()
    writer.close()


class AuthHooks(PassThroughHooks):
    """The agent's policy in miniature: AUTH only as ``app``; the real password is
    substituted; a managed user ``svc`` is answered without forwarding."""

    def __init__(self) -> None:
        self.results: list[tuple[str, bool]] = []

    def on_auth(self, username: bytes | None, password: bytes) -> Action:
        if username == b"svc":
            return Action.respond(b"+OK\r\n")
        if username != b"app":
            return Action.respond(b"-WRONGPASS only the session's db user may log in\r\n")
        return Action.replace("AUTH", "app", "real-secret")

    def on_hello(self, hello: Hello) -> Action:
        if hello.username is None:
            return Action.forward()
        if hello.username != b"app":
            return Action.respond(b"-WRONGPASS only the session's db user may log in\r\n")
        return Action.replace(*hello.with_auth(b"app", b"real-secret"))

    def on_reply(self, name: str, error: bool) -> None:
        if name in ("AUTH", "HELLO"):
            self.results.append((name, error))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_auth_and_hello_go_through_the_hooks(node: ValkeyNode, protocol: int) -> None:
    asyncio.run(node.command("ACL", "SETUSER", "app", "on", ">real-secret", "~*", "+@all"))
    hooks = AuthHooks()
    with ThreadedProxy(node.port, hooks=lambda: hooks) as proxy:
        r = client(proxy, protocol, username="app", password="what-the-user-typed")
        assert r.acl_whoami() in ("app", b"app")
        assert r.set("k", "v")
        if protocol == 3:
            assert r.connection_pool.connection_kwargs["protocol"] == 3
        r.close()
        bad = client(proxy, protocol, username="admin", password="x")
        with pytest.raises((redis.AuthenticationError, redis.ResponseError)):
            bad.ping()
        bad.close()
        raw = RawClient(proxy.port)
        raw.send(cmd("AUTH", "svc", "ignored") + cmd("ACL", "WHOAMI"))
        assert raw.read() == "OK" and raw.read() == b"default"
        raw.send(cmd("HELLO", "3", "AUTH", "app", "typed", "SETNAME", "me"))
        hello = raw.read()
        assert isinstance(hello, dict) and hello[b"proto"] == 3
        raw.send(cmd("CLIENT", "GETNAME") + cmd("ACL", "WHOAMI"))
        assert raw.read() == b"me" and raw.read() == b"app"
        raw.close()
    assert ("HELLO" if protocol == 3 else "AUTH", False) in hooks.results


def test_client_reply_is_refused(proxy: ThreadedProxy) -> None:
    raw = RawClient(proxy.port)
    raw.send(cmd("CLIENT", "REPLY", "OFF") + cmd("PING"))
    err = raw.read()
    assert isinstance(err, Exception) and "CLIENT REPLY" in str(err)
    assert raw.read() == "PONG"
    raw.close()


def test_client_reply_forms_the_server_refuses_get_its_error(
    node: ValkeyNode, proxy: ThreadedProxy
) -> None:
    """Only the valid OFF/SKIP are refused; a malformed CLIENT REPLY (and the no-op ON)
    reaches the server, so the client sees the server's own answer, byte for byte."""
    forms = [
        ("CLIENT", "REPLY", "wrongInput"),
        ("CLIENT", "REPLY"),
        ("CLIENT", "REPLY", "OFF", "extra"),
        ("CLIENT", "reply", "on"),
    ]
    payload = b"".join(cmd(*f) for f in forms) + cmd("PING")
    replies = []
    for port in (node.port, proxy.port):
        raw = RawClient(port)
        raw.send(payload)
        replies.append([raw.read() for _ in range(len(forms) + 1)])
        raw.close()
    direct, proxied = ([repr(r) for r in side] for side in replies)
    assert proxied == direct
    assert "syntax error" in direct[0] and direct[-1] == "'PONG'"
    raw = RawClient(proxy.port)
    for mode in ("OFF", "skip", b"SKIP\x00x"):
        raw.send(cmd("CLIENT", "REPLY", mode) + cmd("PING"))
        err = raw.read()
        assert isinstance(err, Exception) and str(err).startswith("ERR CLIENT REPLY "), err
        assert raw.read() == "PONG"
    raw.close()


def test_inline_commands(proxy: ThreadedProxy) -> None:
    raw = RawClient(proxy.port)
    raw.send(b'PING\r\n\r\nSET greeting "hello world"\nGET greeting\r\n')
    assert raw.read() == "PONG"
    assert raw.read() == "OK"
    assert raw.read() == b"hello world"
    raw.send(b"set 'it''s' x\r\nget its\r\n")  # valkey 9.1: quoted parts are joined
    assert raw.read() == "OK"
    assert raw.read() == b"x"
    raw.send(b"set 'its x\r\n")
    err = raw.read()
    assert isinstance(err, Exception) and "unbalanced quotes" in str(err)
    assert raw.read_all() == b""
    raw.close()


MALFORMED = [
    (b"*abc\r\n", "invalid multibulk length"),
    (b"*99999999999\r\n", "invalid multibulk length"),
    (b"*1\r\n$abc\r\n", "invalid bulk length"),
    (b"*2\r\n$3\r\nSET\r\n$99999999999\r\n", "invalid bulk length"),
    (b"*1\r\nPING\r\n", "expected '$', got 'P'"),
    (b"*1\r\n" * 5000, "expected '$', got '*'"),
    (b"*" + b"9" * 100, "too big mbulk count string"),
    (b"*1\r\n$" + b"9" * 100, "too big bulk count string"),
    (b"a" * (70 * 1024), "too big inline request"),
    (b'GET "unterminated\r\n', "unbalanced quotes in request"),
    (b"*3\r\n$4\r\nAUTH\r\n$1\r\nu\r\n$99999\r\n" + b"p" * 70000 + b"\r\n", "longer than"),
]


@pytest.mark.parametrize(("payload", "message"), MALFORMED, ids=[m for _, m in MALFORMED])
def test_malformed_input_gets_an_error_and_a_close(
    proxy: ThreadedProxy, payload: bytes, message: str
) -> None:
    raw = RawClient(proxy.port)
    raw.send(cmd("PING") + payload)
    out = raw.read_all()
    assert out.startswith(b"+PONG\r\n-ERR Protocol error: "), out[:200]
    assert message.encode() in out
    assert out.endswith(b"\r\n") and out.count(b"\r\n") == 2
    raw.close()
    stats = proxy.finished(1)[0]
    assert stats.reason.startswith("protocol error")


def test_declared_huge_bulk_does_not_buffer(node: ValkeyNode) -> None:
    """A 400 MiB declared value with a small max_bulk is refused before any payload."""
    with ThreadedProxy(node.port, limits=ProxyLimits(max_bulk=1024 * 1024)) as proxy:
        raw = RawClient(proxy.port)
        raw.send(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$419430400\r\n")
        out = raw.read_all()
        assert out == b"-ERR Protocol error: invalid bulk length\r\n"
        raw.close()


def test_garbage_never_hangs_or_crashes(proxy: ThreadedProxy) -> None:
    import random
    import socket

    rng = random.Random(5)
    alphabet = b"*$:+-\r\n0123456789abcPINGSET \"'\\x"
    for _ in range(60):
        blob = bytes(rng.choice(alphabet) for _ in range(rng.randint(1, 300)))
        raw = RawClient(proxy.port)
        raw.send(blob)
        raw.sock.shutdown(socket.SHUT_WR)
        began = time.monotonic()
        raw.read_all()  # the proxy must close after answering what it can
        assert time.monotonic() - began < 4
        raw.close()
    # the proxy still works
    r = client(proxy)
    assert r.ping()
    r.close()


def test_idle_timeout(node: ValkeyNode) -> None:
    with ThreadedProxy(node.port, timeouts=ProxyTimeouts(idle=0.3)) as proxy:
        raw = RawClient(proxy.port)
        raw.send(cmd("PING"))
        assert raw.read() == "PONG"
        began = time.monotonic()
        assert raw.read_all() == b""
        assert 0.2 < time.monotonic() - began < 3
        raw.close()
        assert proxy.finished(1)[0].reason == "idle"


def test_small_pending_bound_still_pipelines(node: ValkeyNode) -> None:
    asyncio.run(node.command("FLUSHALL"))
    with ThreadedProxy(node.port, limits=ProxyLimits(max_pending=8, read_size=512)) as proxy:
        r = client(proxy)
        pipe = r.pipeline(transaction=False)
        for i in range(2000):
            pipe.set(f"b{i}", "x" * (i % 700))
            pipe.strlen(f"b{i}")
        results = pipe.execute()
        assert results[1::2] == [i % 700 for i in range(2000)]
        r.close()


def test_session_counters(proxy: ThreadedProxy) -> None:
    raw = RawClient(proxy.port)
    payload = cmd("SET", "c", "v" * 100) + cmd("GET", "c")
    raw.send(payload)
    assert raw.read() == "OK" and raw.read() == b"v" * 100
    raw.close()
    stats = proxy.finished(1)[0]
    assert stats.commands == 2 and stats.replies == 2
    assert stats.bytes_from_client == len(payload)
    assert stats.bytes_to_client == len(b"+OK\r\n$100\r\n" + b"v" * 100 + b"\r\n")
    assert stats.reason == "client closed"


def _names(items: Sequence[tuple[str, object]]) -> list[str]:
    return [n for n, _ in items]


def test_hook_sees_names_and_inspected_args(node: ValkeyNode) -> None:
    seen: list[tuple[str, int, Sequence[bytes] | None]] = []

    class Hooks(PassThroughHooks):
        def on_command(self, name: str, argc: int, args: Sequence[bytes] | None) -> bytes | None:
            seen.append((name, argc, args))
            return None

    with ThreadedProxy(node.port, hooks=Hooks) as proxy:
        raw = RawClient(proxy.port)
        raw.send(cmd("set", "k", "v") + cmd("Client", "SETNAME", "n") + b"get k\r\n")
        assert raw.read() == "OK" and raw.read() == "OK" and raw.read() == b"v"
        raw.close()
    assert seen == [
        ("SET", 3, None),
        ("CLIENT", 3, [b"Client", b"SETNAME", b"n"]),
        ("GET", 2, [b"get", b"k"]),
    ]


def test_reset_returns_to_resp2_and_leaves_pubsub(proxy: ThreadedProxy) -> None:
    raw = RawClient(proxy.port)
    raw.send(cmd("HELLO", "3") + cmd("SUBSCRIBE", "r1", "r2"))
    assert isinstance(raw.read(), dict)
    assert [raw.read()[1][0] for _ in range(2)] == [b"subscribe", b"subscribe"]
    raw.send(cmd("RESET") + cmd("SET", "after", "reset") + cmd("HGETALL", "none"))
    assert raw.read() == "RESET"
    assert raw.read() == "OK"
    assert raw.read() == []  # RESP2 again: an empty array, not a map
    raw.close()


def test_monitor_streams_other_sessions_commands(proxy: ThreadedProxy) -> None:
    watcher = RawClient(proxy.port)
    other = RawClient(proxy.port)
    watcher.send(cmd("MONITOR"))
    assert watcher.read() == "OK"
    other.send(cmd("SET", "watched", "1"))
    assert other.read() == "OK"
    seen = ""
    while '"watched"' not in seen:
        seen = watcher.read()
    assert '"SET"' in seen or '"set"' in seen
    watcher.close()
    other.close()


def test_resp3_commands_while_subscribed_interleave_with_messages(node: ValkeyNode) -> None:
    """RESP3 allows any command while subscribed: replies and pushes interleave on one
    connection, and each reply still goes with its command."""
    asyncio.run(node.command("DEL", "counter"))
    hooks = Recorder()
    with ThreadedProxy(node.port, hooks=lambda: hooks) as proxy:
        _interleave(proxy)
    names = [n for n, _ in hooks.replies]
    assert names.count("INCR") == 50 and names.count("SUBSCRIBE") == 1


def _interleave(proxy: ThreadedProxy) -> None:
    sub = RawClient(proxy.port)
    pub = RawClient(proxy.port)
    sub.send(cmd("HELLO", "3") + cmd("SUBSCRIBE", "live"))
    assert isinstance(sub.read(), dict)
    assert sub.read() == ("push", [b"subscribe", b"live", 1])
    for i in range(50):
        pub.send(cmd("PUBLISH", "live", f"m{i}"))
        sub.send(cmd("INCR", "counter"))
    for _ in range(50):
        assert pub.read() == 1
    replies, pushes = [], []
    while len(replies) < 50 or len(pushes) < 50:
        item = sub.read()
        (pushes if isinstance(item, tuple) else replies).append(item)
    assert replies == list(range(1, 51))
    assert [p[1][2] for p in pushes] == [f"m{i}".encode() for i in range(50)]
    sub.close()
    pub.close()
    proxy.finished(2)


@pytest.mark.parametrize("how", ["close", "half-close"])
def test_a_client_that_left_consumes_nothing(proxy: ThreadedProxy, how: str) -> None:
    """BLPOP, then the client closes (or half-closes): its BLPOP is dropped at once, as
    the server drops it directly, so an element pushed after stays in the list."""
    key = f"left:{how}".encode()
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    sock.sendall(cmd("DEL", key) + cmd("BLPOP", key, 0))
    assert sock.recv(100) == b":0\r\n"
    time.sleep(0.3)
    if how == "close":
        sock.close()
    else:
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(100) == b""  # not waited for
        sock.close()
    time.sleep(0.2)
    other = RawClient(proxy.port)
    try:
        other.send(cmd("LPUSH", key, "job"))
        assert other.read() == 1
        time.sleep(1.5)
        other.send(cmd("LLEN", key))
        assert other.read() == 1
    finally:
        other.close()


def test_a_half_closed_client_gets_every_reply(proxy: ThreadedProxy) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(
            (cmd("SET", "hc", 1) + cmd("INCR", "hc") + cmd("GET", "hc")) * 200
            + cmd("BLPOP", "hc:none", 0)  # blocked: dropped with the client, as directly
        )
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data == b"+OK\r\n:2\r\n$1\r\n2\r\n" * 200
