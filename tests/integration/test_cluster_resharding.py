"""The cluster engine while slots move: a running pipeline loses nothing and keeps its
order, and a sharded subscription follows its channel to the new owner."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from dbservice.engine.cluster.slots import key_slot
from sandbox.memorydb import StandinConfig, ThreadedStandin
from tests.kits.cluster import ClusterProxy


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedStandin]:
    config = StandinConfig(dir=tmp_path_factory.mktemp("resharding"), shards=3)
    with ThreadedStandin(config) as running:
        yield running


@pytest.fixture(scope="module")
def proxy(standin: ThreadedStandin) -> Iterator[ClusterProxy]:
    with ClusterProxy(standin) as running:
        yield running


@pytest.mark.parametrize("protocol", [2, 3], ids=["resp2", "resp3"])
def test_resharding_during_a_pipeline(
    proxy: ClusterProxy, standin: ThreadedStandin, protocol: int
) -> None:
    tag = f"{{mv{protocol}}}"
    slot = key_slot(tag[1:-1].encode())
    with proxy.client(protocol=protocol) as client:
        client.mset({f"{tag}fill{i}": "x" * 100 for i in range(3000)})  # slow the move down
        stop, failures, pushed = threading.Event(), list[BaseException](), [0]

        def run() -> None:
            i = 0
            try:
                with proxy.client(protocol=protocol) as worker:
                    while not stop.is_set():
                        pipe = worker.pipeline(transaction=False)
                        for j in range(i, i + 16):
                            pipe.rpush(f"{tag}list", j)
                            pipe.incr(f"{tag}n")
                            pipe.set(f"elsewhere{j % 50}", j)
                        replies = pipe.execute()
                        for k, j in enumerate(range(i, i + 16)):
                            assert replies[3 * k] == j + 1, (j, replies[3 * k])
                            assert replies[3 * k + 1] == j + 1, (j, replies[3 * k + 1])
                            assert replies[3 * k + 2] is True
                        i += 16
                        pushed[0] = i
            except BaseException as exc:
                failures.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        try:
            time.sleep(0.2)
            owner = standin.owner_of_slot(slot)
            for target in ((owner + 1) % 3, owner):  # away and back again
                started = pushed[0]
                assert standin.move_slot(slot, target, batch=25) >= 3000
                assert standin.owner_of_slot(slot) == target
                deadline = time.monotonic() + 5
                while pushed[0] < started + 160 and time.monotonic() < deadline:
                    time.sleep(0.01)
        finally:
            stop.set()
            thread.join(20)
        assert not failures, failures
        total = pushed[0]
        assert total > 160
        assert client.lrange(f"{tag}list", 0, -1) == [b"%d" % j for j in range(total)]
        assert client.get(f"{tag}n") == b"%d" % total
        assert client.dbsize() >= 3002
    assert proxy.proxy is not None
    redirects = proxy.proxy.state.redirects
    assert redirects["MOVED"] > 0 and redirects["ASK"] + redirects["TRYAGAIN"] > 0, redirects


def _messages(pubsub: Any, until: float) -> list[Any]:
    out = []
    while time.monotonic() < until:
        message = pubsub.get_message(timeout=0.05)
        if message is not None:
            out.append(message)
    return out


@pytest.mark.parametrize("protocol", [2, 3], ids=["resp2", "resp3"])
def test_sharded_pubsub_follows_a_slot_move(
    proxy: ClusterProxy, standin: ThreadedStandin, protocol: int
) -> None:
    channel = f"{{news{protocol}}}"
    slot = key_slot(channel[1:-1].encode())
    with proxy.client(protocol=protocol) as subscriber, proxy.client(protocol=protocol) as pub:
        pubsub = subscriber.pubsub()
        pubsub.ssubscribe(channel)
        first = pubsub.get_message(timeout=5)
        assert first is not None and first["type"] == "ssubscribe" and first["data"] == 1
        assert pub.spublish(channel, "before") == 1
        got = _messages(pubsub, time.monotonic() + 0.5)
        assert [m["data"] for m in got] == [b"before"]
        owner = standin.owner_of_slot(slot)
        standin.move_slot(slot, (owner + 1) % 3)
        received: list[Any] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(m["data"] == b"after" for m in received):
            pub.spublish(channel, "after")
            received += _messages(pubsub, time.monotonic() + 0.2)
        assert any(m["data"] == b"after" for m in received), received
        assert all(m["type"] == "smessage" for m in received), received  # no sunsubscribe
        pubsub.sunsubscribe(channel)
        confirm = pubsub.get_message(timeout=5)
        assert confirm is not None and confirm["type"] == "sunsubscribe"
        assert confirm["data"] == 0
        pubsub.close()


@pytest.mark.parametrize("protocol", [2, 3], ids=["resp2", "resp3"])
def test_pubsub_cluster_wide(proxy: ClusterProxy, protocol: int) -> None:
    with proxy.client(protocol=protocol) as subscriber, proxy.client(protocol=protocol) as pub:
        pubsub = subscriber.pubsub()
        pubsub.subscribe("alerts")
        pubsub.psubscribe("metrics.*")
        kinds = [pubsub.get_message(timeout=5) for _ in range(2)]
        assert [(m or {}).get("type") for m in kinds] == ["subscribe", "psubscribe"]
        assert [(m or {}).get("data") for m in kinds] == [1, 2]
        assert pub.publish("alerts", "a1") >= 1
        assert pub.publish("metrics.cpu", "90") >= 1
        got = _messages(pubsub, time.monotonic() + 0.5)
        assert [(m["type"], m["data"]) for m in got] == [("message", b"a1"), ("pmessage", b"90")]
        pubsub.ping()
        pong = _messages(pubsub, time.monotonic() + 0.3)
        assert pong and pong[0]["type"] == "pong"
        pubsub.unsubscribe()
        pubsub.punsubscribe()
        ends = _messages(pubsub, time.monotonic() + 0.3)
        assert [m["type"] for m in ends] == ["unsubscribe", "punsubscribe"]
        assert subscriber.ping()  # the connection is usable again
        pubsub.close()


def test_a_shard_down_is_named_then_used_again(tmp_path: Path) -> None:
    config = StandinConfig(dir=tmp_path / "down", shards=3)
    with (
        ThreadedStandin(config) as standin,
        ClusterProxy(standin) as proxy,
        proxy.client() as client,
    ):
        keys = {owner: key for key, owner in _keys_by_owner(standin)}
        for key in keys.values():
            client.set(key, "v")
        for down in (1, 0):  # a shard, then the one behind the configuration endpoint
            host, port = standin.node_fronts[down]
            standin.stop_node(down)
            with pytest.raises(redis.ResponseError) as info:
                client.get(keys[down])
            assert f"{host}:{port}" in str(info.value)  # the client is told which node
            standin.start_node(down)
            deadline = time.monotonic() + 15
            while True:  # the node is back (empty): the engine dials it afresh
                try:
                    client.set(keys[down], "again")
                    break
                except redis.ResponseError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            assert client.get(keys[down]) == b"again"
        assert client.get(keys[2]) == b"v"
        assert client.dbsize() == 3


def _keys_by_owner(standin: ThreadedStandin) -> list[tuple[str, int]]:
    found: dict[int, str] = {}
    for i in range(1000):
        key = f"k{i}"
        owner = standin.owner_of_slot(key_slot(key.encode()))
        found.setdefault(owner, key)
        if len(found) == 3:
            break
    return [(key, owner) for owner, key in found.items()]


def test_a_blocked_session_does_not_hold_others_refresh(
    proxy: ClusterProxy, standin: ThreadedStandin
) -> None:
    moving = b"{refresh}"
    slot = key_slot(moving[1:-1])
    seed_shard_key = next(
        b"{q%d}" % i for i in range(1000) if standin.owner_of_slot(key_slot(b"q%d" % i)) == 0
    )
    with proxy.client() as other:
        other.set(moving + b"k", "v")
        other.delete(seed_shard_key + b"list")
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        try:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            assert sock.recv(100) == b"+PONG\r\n"  # topology known, connections open
            owner = standin.owner_of_slot(slot)
            standin.move_slot(slot, (owner + 1) % 3)
            # the session's first command meets MOVED; its second blocks on the
            # configuration endpoint's node (the connection a refresh used to take)
            get = b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(moving) + 1, moving + b"k")
            blpop = b"*3\r\n$5\r\nBLPOP\r\n$%d\r\n%s\r\n$1\r\n0\r\n" % (
                len(seed_shard_key) + 4,
                seed_shard_key + b"list",
            )
            sock.sendall(get + blpop)
            began = time.monotonic()
            assert other.get(moving + b"k") == b"v"  # another session is not held up
            assert time.monotonic() - began < 3
            other.rpush(seed_shard_key + b"list", "x")
            data = b""
            while data.count(b"\r\n") < 6:
                data += sock.recv(4096)
            assert data.startswith(b"$1\r\nv\r\n*2\r\n")
        finally:
            sock.close()


class _Migration:
    """Slot ``slot`` half moved from its owner to the next primary, as
    ``valkey-cli --cluster reshard`` leaves it mid-way: IMPORTING on the target,
    MIGRATING on the source, the slot's keys MIGRATEd; :meth:`finish` ends it."""

    def __init__(self, standin: ThreadedStandin, slot: int) -> None:
        self.slot = slot
        owner = standin.owner_of_slot(slot)
        target = standin.nodes[(owner + 1) % 3]
        self.target_port = target.port
        self.nodes = [redis.Redis(host=n.host, port=n.port) for n in standin.nodes[:3]]
        self.source, self.target = self.nodes[owner], self.nodes[(owner + 1) % 3]
        self.target_id = self.target.execute_command("CLUSTER", "MYID")
        source_id = self.source.execute_command("CLUSTER", "MYID")
        self.target.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        self.source.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", self.target_id)
        keys = self.source.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1000)
        if keys:
            self.source.execute_command(
                "MIGRATE", target.host, target.port, "", 0, 5000, "KEYS", *keys
            )

    def finish(self) -> None:
        for node in (self.target, self.source, *self.nodes):
            node.execute_command("CLUSTER", "SETSLOT", self.slot, "NODE", self.target_id)

    def close(self) -> None:
        for node in self.nodes:
            node.close()


def _exchange(port: int, commands: list[list[bytes]], replies: int) -> bytes:
    """Send ``commands`` in one write on a fresh connection; read until ``replies``
    replies (counted as top-level lines, enough for the flat replies used here)."""
    payload = b"".join(
        b"*%d\r\n" % len(c) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in c) for c in commands
    )
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(payload)
        data = b""
        while data.count(b"\r\n") < replies:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                raise AssertionError(f"no more replies after {data!r}") from None
            if not chunk:
                break
            data += chunk
        return data


_TX = [[b"MULTI"], [b"INCR", b"{w1}:ctr"], [b"SET", b"{w1}:mark", b"x"], [b"EXEC"]]


def test_a_transaction_meets_its_slot_mid_migration(
    proxy: ClusterProxy, standin: ThreadedStandin
) -> None:
    """The source answers EXEC with ASK, the importing node (after ASKING) with TRYAGAIN
    while the migration lasts: the engine follows both, and once the slot has moved the
    client gets the transaction's own result, never an internal node address."""
    slot = key_slot(b"w1")
    with proxy.client() as client:
        client.set("{w1}:ctr", 5)
        client.delete("{w1}:mark")
    migration = _Migration(standin, slot)
    try:
        # one key, present at the importing node: ASKING there runs it at once
        one = _exchange(proxy.port, [[b"MULTI"], [b"INCR", b"{w1}:ctr"], [b"EXEC"]], 4)
        assert one == b"+OK\r\n+QUEUED\r\n*1\r\n:6\r\n", one
        # two keys, one nowhere yet: TRYAGAIN until the slot has moved
        timer = threading.Timer(0.3, migration.finish)
        timer.start()
        try:
            two = _exchange(proxy.port, _TX, 6)
        finally:
            timer.join()
        assert two == b"+OK\r\n+QUEUED\r\n+QUEUED\r\n*2\r\n:7\r\n+OK\r\n", two
    finally:
        migration.finish()
        migration.close()
    with proxy.client() as client:
        assert client.get("{w1}:ctr") == b"7" and client.get("{w1}:mark") == b"x"


def test_a_transaction_under_watch_mid_migration_is_a_failed_watch(
    proxy: ClusterProxy, standin: ThreadedStandin
) -> None:
    """A redirect at EXEC cannot carry the WATCH to another node: EXEC answers as a
    failed WATCH (null), and the client's usual retry runs it once the slot settles."""
    slot = key_slot(b"w2")
    with proxy.client() as client, proxy.client(protocol=3) as client3:
        client.set("{w2}:ctr", 1)
        for c in (client, client3):
            pipe = c.pipeline()
            pipe.watch("{w2}:ctr")
            migration = _Migration(standin, slot)
            try:
                pipe.multi()
                pipe.incr("{w2}:ctr")
                with pytest.raises(redis.WatchError):
                    pipe.execute()
            finally:
                migration.finish()
                migration.close()
            pipe.reset()
            with c.pipeline() as again:  # the retry runs where the slot is now
                again.watch("{w2}:ctr")
                again.multi()
                again.incr("{w2}:ctr")
                assert again.execute() == [2 if c is client else 3]
            assert standin.nodes[standin.owner_of_slot(slot)].port == migration.target_port
