"""The cluster engine in front of a 3-shard stand-in: a client sees one plain server
(redis-py RESP2 and RESP3, valkey-cli without -c) and every supported command works."""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator

import pytest
import redis

from dbservice.engine.cluster.resp import encode_command
from dbservice.engine.cluster.slots import key_slot
from sandbox.memorydb import StandinConfig, ThreadedStandin
from tests.kits.cluster import ClusterProxy
from tests.kits.proxy import Recorder, valkey_cli


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedStandin]:
    config = StandinConfig(dir=tmp_path_factory.mktemp("cluster"), shards=3, replicas=1)
    with ThreadedStandin(config) as running:
        yield running


@pytest.fixture(scope="module")
def proxy(standin: ThreadedStandin) -> Iterator[ClusterProxy]:
    with ClusterProxy(standin) as running:
        yield running


@pytest.fixture
def client(proxy: ClusterProxy, request: pytest.FixtureRequest) -> Iterator[redis.Redis]:
    protocol = getattr(request, "param", 2)
    with proxy.client(protocol=protocol) as connection:
        connection.flushall()
        yield connection


def direct(standin: ThreadedStandin, shard: int) -> redis.Redis:
    host, port = standin.node_fronts[shard]
    return redis.Redis(host, port, ssl=True, ssl_ca_certs=str(standin.ca_file), socket_timeout=5)


BOTH = pytest.mark.parametrize("client", [2, 3], indirect=True, ids=["resp2", "resp3"])


@BOTH
def test_keyed_commands_reach_every_shard(client: redis.Redis, standin: ThreadedStandin) -> None:
    keys = [b"key:%d" % i for i in range(60)]
    for i, key in enumerate(keys):
        assert client.set(key, i)
    assert [client.get(k) for k in keys] == [b"%d" % i for i in range(60)]
    owned = []
    for shard in range(3):
        with direct(standin, shard) as node:
            owned.append(node.dbsize())
    assert sum(owned) == 60 and all(owned)  # every shard holds some
    client.hset("h", mapping={"f": "1", "g": "2"})
    assert client.hgetall("h") == {b"f": b"1", b"g": b"2"}
    client.rpush("l", 1, 2, 3)
    assert client.lrange("l", 0, -1) == [b"1", b"2", b"3"]
    client.zadd("z", {"m": 1.5})
    assert client.zscore("z", "m") == 1.5
    assert client.sadd("s", "a", "b") == 2 and client.smembers("s") == {b"a", b"b"}
    assert client.incr("n") == 1 and client.expire("n", 100) and client.ttl("n") > 0
    assert client.echo("hi") == b"hi" and client.ping()
    assert client.object("encoding", "n") in (b"int", "int")


@BOTH
def test_multi_key_commands_split_per_slot(client: redis.Redis) -> None:
    mapping = {f"m{i}": str(i) for i in range(50)}
    assert len({key_slot(k.encode()) for k in mapping}) > 40
    assert client.mset(mapping)
    names = [*mapping, "missing"]
    assert client.mget(names) == [v.encode() for v in mapping.values()] + [None]
    assert client.exists(*names, "m0") == 51
    assert client.touch(*names) == 50
    assert client.delete("m0", "m1", "m2", "missing") == 3
    assert client.unlink(*[f"m{i}" for i in range(3, 50)]) == 47
    assert client.dbsize() == 0
    # one slot: one shard, atomically
    assert client.mset({"{u}a": "1", "{u}b": "2"}) and client.mget("{u}a", "{u}b") == [b"1", b"2"]
    # other multi-key commands across slots: the server's own CROSSSLOT
    with pytest.raises(redis.ResponseError, match="same slot"):
        client.sunionstore("dst", ["s1", "s2", "s3"])
    with pytest.raises(redis.ResponseError, match="same slot"):
        client.msetnx({"m1": "1", "m2": "2", "m3": "3"})


@BOTH
def test_whole_cluster_commands(client: redis.Redis, proxy: ClusterProxy) -> None:
    for i in range(30):
        client.set(f"w{i}", i, ex=1000 if i % 2 else None)
    assert client.dbsize() == 30
    assert sorted(client.keys("w*")) == sorted(f"w{i}".encode() for i in range(30))
    assert client.randomkey() is not None
    info = client.info("keyspace")
    assert info["db0"]["keys"] == 30 and info["db0"]["expires"] == 15
    server = client.info()
    assert server["cluster_shards"] == 3 and server["cluster_enabled"] == 1
    sha = client.script_load("return redis.call('get', KEYS[1])")
    assert client.script_exists(sha, "0" * 40) == [True, False]
    assert [client.evalsha(sha, 1, f"w{i}") for i in range(5)] == [b"%d" % i for i in range(5)]
    assert client.script_flush()
    assert client.script_exists(sha) == [False]
    library = "#!lua name=lib\nserver.register_function('echoit', function(k, a) return a[1] end)"
    assert client.function_load(library, replace=True) in ("lib", b"lib")
    assert [client.fcall("echoit", 1, f"w{i}", "x") for i in range(3)] == [b"x"] * 3
    listed = client.function_list()
    assert "echoit" in repr(listed)
    client.function_flush()
    assert client.execute_command("SELECT", 0) in (True, b"OK", "OK")
    with pytest.raises(redis.ResponseError, match="SELECT is not allowed"):
        client.execute_command("SELECT", 1)
    assert client.flushdb() and client.dbsize() == 0
    assert client.flushall() and client.dbsize() == 0


@BOTH
def test_cluster_and_client_commands_as_one_node(client: redis.Redis) -> None:
    info = client.execute_command("CLUSTER", "INFO")
    text = info.decode() if isinstance(info, bytes) else str(info)
    assert "cluster_state:ok" in text and "cluster_known_nodes:1" in text
    slots = client.execute_command("CLUSTER", "SLOTS")
    assert len(slots) == 1 and slots[0][0] == 0 and slots[0][1] == 16383
    nodes = client.execute_command("CLUSTER", "NODES")
    assert b"myself,master" in nodes and b"0-16383" in nodes
    assert len(client.execute_command("CLUSTER", "SHARDS")) == 1
    assert client.execute_command("CLUSTER", "KEYSLOT", "foo") == 12182
    assert len(client.execute_command("CLUSTER", "MYID")) == 40
    with pytest.raises(redis.ResponseError, match="--node"):
        client.execute_command("CLUSTER", "FAILOVER")
    client.set("foo", 1)
    assert client.execute_command("CLUSTER", "COUNTKEYSINSLOT", 12182) == 1
    assert client.client_setname("app-1")
    assert client.client_getname() in ("app-1", b"app-1")
    assert isinstance(client.client_id(), int)
    assert client.client_info()["name"] in ("app-1", b"app-1")
    with pytest.raises(redis.ResponseError, match="not supported in cluster mode"):
        client.execute_command("CLIENT", "KILL", "ID", "1")
    with pytest.raises(redis.ResponseError, match="not supported in cluster mode"):
        client.execute_command("MONITOR")


@BOTH
def test_scan_walks_every_shard_once(client: redis.Redis) -> None:
    total = 50_000
    pipe = client.pipeline(transaction=False)
    for start in range(0, total, 1000):
        pipe.mset({f"scan:{i}": "v" for i in range(start, start + 1000)})
    assert all(pipe.execute())
    assert client.dbsize() == total
    seen = Counter(client.scan_iter(count=1000))
    assert len(seen) == total and set(seen.values()) == {1}
    matched = Counter(client.scan_iter(match="scan:1*", count=500))
    assert set(matched.values()) == {1}
    assert len(matched) == sum(1 for i in range(total) if str(i).startswith("1"))
    with pytest.raises(redis.ResponseError, match="invalid cursor"):
        client.scan(cursor=5 << 10 | 1000)


@BOTH
def test_transactions_on_one_slot(client: redis.Redis, proxy: ClusterProxy) -> None:
    pipe = client.pipeline(transaction=True)
    pipe.set("{acct}:a", 10).incrby("{acct}:a", 5).get("{acct}:a").ping()
    assert pipe.execute() == [True, 15, b"15", True]
    cross = client.pipeline(transaction=True)
    cross.set("a", 1).set("b", 2).set("c", 3)
    with pytest.raises(redis.ResponseError, match=r"same slot|EXECABORT|discarded"):
        cross.execute()
    assert client.get("a") is None  # nothing ran
    # WATCH: a change by somebody else aborts the transaction
    with proxy.client() as other:
        pipe = client.pipeline(transaction=True)
        pipe.watch("{acct}:a")
        assert pipe.get("{acct}:a") == b"15"
        other.set("{acct}:a", 0)
        pipe.multi()
        pipe.set("{acct}:a", 99)
        with pytest.raises(redis.WatchError):
            pipe.execute()
    assert client.get("{acct}:a") == b"0"
    with pytest.raises(redis.ResponseError, match="same slot"):
        client.execute_command("WATCH", "a", "b", "c")


def test_pipeline_keeps_order_across_shards(client: redis.Redis) -> None:
    pipe = client.pipeline(transaction=False)
    for i in range(2000):
        pipe.set(f"p{i}", i)
        pipe.get(f"p{i}")
        pipe.incr(f"c{i % 7}")
    replies = pipe.execute()
    counters = [0] * 7
    for i in range(2000):
        assert replies[3 * i] is True and replies[3 * i + 1] == b"%d" % i
        counters[i % 7] += 1
        assert replies[3 * i + 2] == counters[i % 7]


def test_hooks_see_every_command_in_order(standin: ThreadedStandin) -> None:
    recorders: list[Recorder] = []

    def hooks() -> Recorder:
        recorders.append(Recorder(refuse=["FLUSHALL"]))
        return recorders[-1]

    with ClusterProxy(standin, hooks=hooks) as proxy, proxy.client() as client:
        pipe = client.pipeline(transaction=False)
        pipe.mset({"a": 1, "b": 2}).mget("a", "b").dbsize().flushall().get("a")
        results = pipe.execute(raise_on_error=False)
        assert isinstance(results[3], redis.ResponseError) and "refused" in str(results[3])
        assert results[1] == [b"1", b"2"] and results[4] == b"1"
    names = [name for name, _ in recorders[0].commands]
    assert names[-4:] == ["MSET", "MGET", "DBSIZE", "GET"]
    assert [name for name, _ in recorders[0].replies][-4:] == ["MSET", "MGET", "DBSIZE", "GET"]
    client = redis.Redis(*standin.node_fronts[0], ssl=True, ssl_ca_certs=str(standin.ca_file))
    with client:
        client.flushall()


class _SomeReplies(Recorder):
    reply_names = frozenset({"GET", "INCRBY"})  # redis-py's incr()


def test_hooks_with_reply_names_hear_only_of_those_replies(standin: ThreadedStandin) -> None:
    """As the single-node engine: hooks naming ``reply_names`` (the agent's: AUTH and
    HELLO) hear of those replies only, in order, with whether each was an error."""
    recorders: list[Recorder] = []

    def hooks() -> Recorder:
        recorders.append(_SomeReplies())
        return recorders[-1]

    with ClusterProxy(standin, hooks=hooks) as proxy, proxy.client() as client:
        pipe = client.pipeline(transaction=False)
        pipe.set("rn:a", "x").get("rn:a").incr("rn:a").get("rn:b").delete("rn:a")
        results = pipe.execute(raise_on_error=False)
        assert results[1] == b"x" and isinstance(results[2], redis.ResponseError)
    assert recorders[0].replies == [("GET", False), ("INCRBY", True), ("GET", False)]


def test_blocking_command_does_not_block_other_sessions(proxy: ClusterProxy) -> None:
    with proxy.client() as waiter, proxy.client() as other:
        other.delete("queue")
        result: list[object] = []
        thread = threading.Thread(target=lambda: result.append(waiter.blpop(["queue"], 10)))
        thread.start()
        time.sleep(0.2)
        for i in range(20):  # every shard keeps answering others meanwhile
            assert other.set(f"b{i}", i)
        assert thread.is_alive()
        other.rpush("queue", "job")
        thread.join(5)
        assert result == [(b"queue", b"job")] or result == [[b"queue", b"job"]]


@pytest.mark.parametrize("resp3", [False, True], ids=["resp2", "resp3"])
def test_valkey_cli_without_cluster_mode(proxy: ClusterProxy, resp3: bool) -> None:
    def cli(*args: str) -> str:
        flags = ["-3"] if resp3 else []
        out = subprocess.run(
            [str(valkey_cli()), "-p", str(proxy.port), *flags, *args],
            capture_output=True, text=True, timeout=20, check=True,
        )  # fmt: skip
        return out.stdout.strip()

    cli("FLUSHALL")
    assert cli("MSET", "a", "1", "b", "2", "c", "3") == "OK"
    assert cli("MGET", "a", "b", "c").split() == ["1", "2", "3"]
    assert cli("DBSIZE") == "3"
    assert sorted(cli("--scan").split()) == ["a", "b", "c"]
    assert "cluster_state:ok" in cli("CLUSTER", "INFO")
    assert "db0:keys=3" in cli("INFO", "keyspace")
    assert cli("CLIENT", "SETNAME", "cli") == "OK"
    assert cli("--no-raw", "SELECT", "0") == "OK"
    assert "CROSSSLOT" in cli("SINTERSTORE", "d", "a", "b")


def test_sessions_end_cleanly(proxy: ClusterProxy) -> None:
    before = len(proxy.finished(0))
    with proxy.client() as client:
        client.set("x", 1)
        client.get("y")
    stats = proxy.finished(before + 1)[-1]
    assert stats.reason == "client closed" and stats.commands >= 2 and stats.replies >= 2
    assert stats.bytes_from_client > 0 and stats.bytes_to_client > 0


def test_client_gone_with_a_blocking_command_pending(proxy: ClusterProxy) -> None:
    before = len(proxy.finished(0))
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    sock.sendall(b"*3\r\n$5\r\nBLPOP\r\n$7\r\nnothing\r\n$1\r\n0\r\n")
    time.sleep(0.2)
    sock.shutdown(socket.SHUT_WR)  # nothing more from the client: the session ends anyway
    began = time.monotonic()
    stats = proxy.finished(before + 1, limit=10)[-1]
    assert time.monotonic() - began < 5
    assert stats.reason == "client closed"
    sock.close()


def test_malformed_input_is_answered_then_closed(proxy: ClusterProxy) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(b"*1\r\n$4\r\nPING\r\n*1\r\n+oops\r\n")
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    assert data == b"+PONG\r\n-ERR Protocol error: expected '$', got '+'\r\n"


@BOTH
def test_streams_blocking_reads_and_wait(client: redis.Redis) -> None:
    for i, stream in enumerate(("s:a", "s:b", "s:c")):
        client.xadd(stream, {"n": str(i)})
    got = client.xread({"s:a": 0}, block=100)
    assert len(got) == 1
    with pytest.raises(redis.ResponseError, match="same slot"):
        client.xread({"s:a": 0, "s:b": 0}, block=100)  # the server's CROSSSLOT
    assert client.xread({"{s}x": "$"}, block=50) in (None, [], {})  # times out: nil
    assert client.blpop(["empty:list"], timeout=0.1) is None
    client.set("w", 1)
    assert client.wait(1, 1000) == 1  # the replica of w's shard acknowledged


def _command(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


def _exchange(sock: socket.socket, payload: bytes, end: bytes) -> bytes:
    """``payload`` in one write; what comes back, up to and including ``end``."""
    sock.sendall(payload)
    data = b""
    while not data.endswith(end):
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            raise AssertionError(f"no more after {data!r}") from None
        assert chunk, f"closed after {data!r}"
        data += chunk
    return data


def _side_by_side(
    proxy: ClusterProxy, standin: ThreadedStandin, node: int, protocol: int, payload: bytes
) -> tuple[bytes, bytes]:
    """The replies to ``payload`` (which ends with ``ECHO done``) from a cluster node
    itself and through the engine, both after ``HELLO <protocol>``."""
    end = b"$4\r\ndone\r\n"
    hello = _command(b"HELLO", b"%d" % protocol)
    tls = ssl.create_default_context(cafile=str(standin.ca_file))
    tls.check_hostname = False
    out = []
    for raw in (
        socket.create_connection(standin.node_fronts[node], timeout=10),
        socket.create_connection(("127.0.0.1", proxy.port), timeout=10),
    ):
        sock = tls.wrap_socket(raw) if raw.getpeername()[1] != proxy.port else raw
        with sock:
            _exchange(sock, hello + _command(b"ECHO", b"done"), end)
            out.append(_exchange(sock, payload, end))
    return out[0], out[1]


@pytest.mark.parametrize("protocol", [2, 3], ids=["resp2", "resp3"])
def test_a_pipeline_behind_subscribe_is_answered_as_the_server_does(
    proxy: ClusterProxy, standin: ThreadedStandin, protocol: int
) -> None:
    """RESP2: once SUBSCRIBE is in, the server refuses all but (P|S)(UN)SUBSCRIBE, PING,
    QUIT and RESET (an unknown command or a wrong arity keeps its own error), until the
    last UNSUBSCRIBE; RESP3 allows everything. The engine answers a pipeline sent in one
    write byte for byte as a node does."""
    key = b"{sub}k"
    node = standin.owner_of_slot(key_slot(key))
    with proxy.client() as client:
        client.set(key, "v")
    subscribed = [_command(b"GET", key), _command(b"PING"), _command(b"PING", b"hi")]
    if protocol == 2:
        subscribed += [
            _command(b"CLIENT", b"ID"),
            _command(b"FOO", b"bar"),
            _command(b"GET"),
            _command(b"CLIENT", b"NOSUCH"),
            _command(b"HELLO", b"3"),
            _command(b"AUTH", b"nobody", b"secret"),
            _command(b"SET", key, b"w"),
        ]
    payload = b"".join(
        [
            _command(b"SUBSCRIBE", b"ch"),
            *subscribed,
            _command(b"PSUBSCRIBE", b"p*"),
            _command(b"UNSUBSCRIBE"),
            _command(b"GET", key),  # still subscribed to a pattern
            _command(b"PUNSUBSCRIBE"),
            _command(b"GET", key),
            _command(b"ECHO", b"done"),
        ]
    )
    direct_replies, engine_replies = _side_by_side(proxy, standin, node, protocol, payload)
    assert engine_replies == direct_replies
    refused = b"-ERR Can't execute 'get': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING"
    assert (refused in engine_replies) == (protocol == 2)
    assert b"Can't execute 'client|id'" in engine_replies or protocol == 3
    assert engine_replies.endswith(b"$1\r\nv\r\n$4\r\ndone\r\n")  # nothing refused ran


@pytest.mark.parametrize("protocol", [2, 3], ids=["resp2", "resp3"])
def test_a_pipeline_behind_ssubscribe_is_answered_as_the_server_does(
    proxy: ClusterProxy, standin: ThreadedStandin, protocol: int
) -> None:
    key, channel = b"{ssub}k", b"{ssub}ch"
    node = standin.owner_of_slot(key_slot(key))
    with proxy.client() as client:
        client.set(key, "v")
    payload = b"".join(
        [
            _command(b"SSUBSCRIBE", channel),
            _command(b"GET", key),
            _command(b"PING"),
            _command(b"SUNSUBSCRIBE"),
            _command(b"GET", key),
            _command(b"ECHO", b"done"),
        ]
    )
    direct_replies, engine_replies = _side_by_side(proxy, standin, node, protocol, payload)
    assert engine_replies == direct_replies


def _cmd(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


@pytest.mark.parametrize("how", ["close", "half-close"])
def test_a_client_that_left_consumes_nothing(proxy: ClusterProxy, how: str) -> None:
    """BLPOP, then the client closes (or half-closes): its BLPOP is dropped at once on
    the shard, as the server drops it directly, so an element pushed after stays."""
    key = f"left:{how}".encode()
    with proxy.client() as other:
        other.delete(key)
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        sock.sendall(_cmd(b"BLPOP", key, b"0"))
        time.sleep(0.3)
        if how == "close":
            sock.close()
        else:
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(100) == b""  # not waited for
            sock.close()
        time.sleep(0.2)
        assert other.lpush(key, "job") == 1
        time.sleep(1.5)
        assert other.llen(key) == 1


def test_a_half_closed_client_gets_every_reply(proxy: ClusterProxy) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        pipeline = b""
        for i in range(100):
            key = b"hc%d" % i  # over every shard
            pipeline += _cmd(b"SET", key, b"1") + _cmd(b"INCR", key)
        sock.sendall(pipeline + _cmd(b"BLPOP", b"hc:none", b"0"))
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data == b"+OK\r\n:2\r\n" * 100


def test_the_quick_path_answers_as_the_server(proxy: ClusterProxy) -> None:
    """Single-key commands take the engine's quick path (one table lookup, no
    coroutine): any spelling, a wrong number of arguments, options after the key, and
    the same commands inside MULTI are answered as the server answers them, in order."""
    commands = [
        [b"sEt", b"quick:a", b"1"],
        [b"get", b"quick:a"],
        [b"SET", b"quick:a"],
        [b"GET"],
        [b"GET", b"quick:a", b"extra"],
        [b"SET", b"quick:b", b"2", b"EX", b"100"],
        [b"incr", b"quick:c"],
        [b"MULTI"],
        [b"SET", b"quick:a", b"3"],
        [b"GET", b"quick:a"],
        [b"EXEC"],
        [b"GET", b"quick:a"],
    ]
    expected = (
        b"+OK\r\n$1\r\n1\r\n"
        b"-ERR wrong number of arguments for 'set' command\r\n"
        b"-ERR wrong number of arguments for 'get' command\r\n"
        b"-ERR wrong number of arguments for 'get' command\r\n"
        b"+OK\r\n:1\r\n+OK\r\n+QUEUED\r\n+QUEUED\r\n*2\r\n+OK\r\n$1\r\n3\r\n$1\r\n3\r\n"
    )
    with proxy.connect() as sock:
        sock.sendall(b"".join(encode_command(c) for c in commands))
        data = b""
        while len(data) < len(expected) and (chunk := sock.recv(4096)):
            data += chunk
    assert data == expected


def _until_closed(sock: socket.socket, payload: bytes) -> bytes:
    """``payload`` in one write; everything that comes back until the peer closes."""
    sock.sendall(payload)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            raise AssertionError(f"not closed after {data!r}") from None
        if not chunk:
            return data
        data += chunk


@pytest.mark.parametrize("keys", [["{q}a"], ["{q}a", "b", "c"]], ids=["one-shard", "shards"])
def test_replies_owed_before_a_pipelined_quit_are_delivered(
    proxy: ClusterProxy, standin: ThreadedStandin, keys: list[str]
) -> None:
    """Commands and QUIT in one write: the server answers each, then +OK, then closes;
    the engine once dropped every reply still owed when its QUIT arrived."""
    node = standin.node_fronts[standin.owner_of_slot(key_slot(b"{q}a"))]
    tls = ssl.create_default_context(cafile=str(standin.ca_file))
    tls.check_hostname = False
    local = [k for k in keys if k.startswith("{q}")]  # the node answers only its own slots
    out = []
    for target, names in ((node, local), (("127.0.0.1", proxy.port), keys)):
        payload = b"".join(_command(b"SET", k.encode(), b"v") for k in names)
        payload += b"".join(_command(b"GET", k.encode()) for k in names) + _command(b"QUIT")
        raw = socket.create_connection(target, timeout=10)
        sock = tls.wrap_socket(raw) if target == node else raw
        with sock:
            out.append(_until_closed(sock, payload))
    direct, through = out
    assert direct == b"+OK\r\n" * len(local) + b"$1\r\nv\r\n" * len(local) + b"+OK\r\n"
    assert through == b"+OK\r\n" * len(keys) + b"$1\r\nv\r\n" * len(keys) + b"+OK\r\n"


def test_a_shard_connection_lost_under_a_pipeline_answers_each_command_on_it(
    client: redis.Redis, standin: ThreadedStandin
) -> None:
    """Plain commands pipelined behind a BLPOP on one shard's connection, and others on
    another shard: when that connection ends, each command owed on it gets the engine's
    error, in the client's order, the other shard's replies are untouched, and the
    session goes on with a new connection."""
    shard = standin.owner_of_slot(key_slot(b"{lost}"))
    other = next(
        f"o{i}" for i in range(100) if standin.owner_of_slot(key_slot(b"o%d" % i)) != shard
    )
    assert client.set("{lost}warm", 1) and client.set(other, "w")  # both links open
    pipe = client.pipeline(transaction=False)
    pipe.blpop(["{lost}list"], 0)
    pipe.get("{lost}a")
    pipe.set(other, "v")
    pipe.set("{lost}b", "v")
    pipe.get(other)
    replies: list[object] = []
    running = threading.Thread(target=lambda: replies.extend(pipe.execute(raise_on_error=False)))
    running.start()
    with direct(standin, shard) as node:
        deadline = time.monotonic() + 10
        while True:
            blocked = [c for c in node.client_list() if c.get("cmd") == "blpop"]
            if blocked or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert blocked, "the BLPOP never reached the node"
        node.execute_command("CLIENT", "KILL", "ID", blocked[0]["id"])
    running.join(10)
    assert not running.is_alive()
    lost = [replies[i] for i in (0, 1, 3)]
    assert all(isinstance(r, redis.ResponseError) for r in lost), replies
    assert len({str(r) for r in lost}) == 1, replies
    assert str(lost[0]).startswith("fleetgate: connection to node "), replies
    assert replies[2] is True and replies[4] == b"v", replies
    assert client.get("{lost}warm") == b"1" and client.get("{lost}b") is None


@pytest.mark.parametrize("piece", [0, 1, 5, 64], ids=["whole", "bytes", "fives", "64s"])
def test_a_pipeline_in_pieces_is_answered_as_the_server_does(
    proxy: ClusterProxy, standin: ThreadedStandin, piece: int
) -> None:
    """A pipeline a session starts with (its first command waits for the cluster to be
    learned while the rest arrives), sent whole or in pieces of a few bytes: replies,
    errors and the close after QUIT are the server's own, byte for byte. Keys share a
    hash tag so that the node owning it can answer the same bytes."""
    node = standin.node_fronts[standin.owner_of_slot(key_slot(b"{pp}"))]
    tls = ssl.create_default_context(cafile=str(standin.ca_file))
    tls.check_hostname = False
    payload = b"".join(
        [
            _command(b"DEL", b"{pp}a", b"{pp}h"),
            _command(b"SET", b"{pp}a", b"1"),
            _command(b"get", b"{pp}a"),
            _command(b"INCR", b"{pp}a"),
            _command(b"GET", b"{pp}missing"),
            _command(b"HSET", b"{pp}a", b"f", b"v"),  # WRONGTYPE
            b"PING\r\n",  # inline
            _command(b"GET"),  # wrong number of arguments
            _command(b"GET", b"{pp}a", b"extra"),
            _command(b"NOSUCH", b"{pp}a"),
            _command(b"ECHO", b"x" * 300),
            _command(b"HSET", b"{pp}h", b"f", b"v"),
            _command(b"HGET", b"{pp}h", b"f"),
            _command(b"DEL", b"{pp}a", b"{pp}h"),
            _command(b"QUIT"),
        ]
    )
    out = []
    for target in (node, ("127.0.0.1", proxy.port)):
        raw = socket.create_connection(target, timeout=10)
        sock = tls.wrap_socket(raw) if target == node else raw
        with sock:
            if target == node or not piece:
                out.append(_until_closed(sock, payload))
                continue
            for at in range(0, len(payload) - 1, piece):
                sock.sendall(payload[at : min(at + piece, len(payload) - 1)])
            out.append(_until_closed(sock, payload[-1:]))
    direct, through = out
    assert through == direct
    assert direct.endswith(b"+OK\r\n") and b"WRONGTYPE" in direct
