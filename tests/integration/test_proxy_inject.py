"""The agent's own commands on a live session (``ProxySession.inject``): written between
two client commands, their replies kept from the client, refused where the server would
not take them; against a real valkey-server with redis-py and raw sockets."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import pytest
import redis

from dbservice.engine.proxy import ProxySession
from sandbox.valkeynode import ValkeyNode
from tests.kits import proxy as proxykit
from tests.kits.proxy import RawClient, ThreadedProxy, cmd

node, proxy = proxykit.node, proxykit.proxy  # the kit's fixtures, used by name

T = TypeVar("T")


def in_proxy(proxy: ThreadedProxy, call: Callable[[], T]) -> T:
    """Run ``call`` on the engine's loop (sessions are not thread-safe) and return its
    result."""

    async def run() -> T:
        return call()

    assert proxy._loop is not None
    return asyncio.run_coroutine_threadsafe(run(), proxy._loop).result(5)


def session(proxy: ThreadedProxy) -> ProxySession:
    """The one live session (waits for it)."""
    deadline = time.monotonic() + 5
    while True:
        assert proxy.proxy is not None
        live = in_proxy(proxy, lambda: list(proxy.proxy.live) if proxy.proxy else [])
        if len(live) == 1:
            return live[0]
        assert time.monotonic() < deadline, f"{len(live)} live sessions"
        time.sleep(0.01)


class Injection:
    """One ``inject`` call made on the engine's loop; ``ok`` is what ``on_reply`` got."""

    def __init__(self, proxy: ThreadedProxy, target: ProxySession, args: Sequence[bytes]):
        self.answered = threading.Event()
        self.ok: bool | None = None
        self.accepted = in_proxy(proxy, lambda: target.inject(args, self._on_reply))

    def _on_reply(self, ok: bool) -> None:
        self.ok = ok
        self.answered.set()

    def result(self) -> bool:
        assert self.accepted
        assert self.answered.wait(5), "no reply to the injected command"
        assert self.ok is not None
        return self.ok


def received(proxy: ThreadedProxy, target: ProxySession, size: int) -> None:
    """Wait until the session has read ``size`` bytes from its client."""
    deadline = time.monotonic() + 5
    while in_proxy(proxy, lambda: target.stats.bytes_from_client) < size:
        assert time.monotonic() < deadline, "the engine did not read what was sent"
        time.sleep(0.01)


@pytest.mark.parametrize("protocol", [2, 3])
def test_inject_during_pipelined_workload(proxy: ThreadedProxy, protocol: int) -> None:
    r = redis.Redis(port=proxy.port, protocol=protocol, socket_timeout=10)
    assert r.ping()
    target = session(proxy)
    stop = threading.Event()
    failures: list[BaseException] = []
    rounds = [0]

    def workload() -> None:
        try:
            while not stop.is_set():
                n = rounds[0]
                pipe = r.pipeline(transaction=False)
                for i in range(300):
                    pipe.set(f"k{i}", f"{n}-{i}")
                    pipe.incr(f"n{i}")
                    pipe.get(f"k{i}")
                results = pipe.execute()
                assert results[0::3] == [True] * 300
                assert results[1::3] == [n + 1] * 300
                assert results[2::3] == [f"{n}-{i}".encode() for i in range(300)]
                rounds[0] = n + 1
        except BaseException as exc:
            failures.append(exc)

    worker = threading.Thread(target=workload)
    worker.start()
    injections: list[Injection] = []
    try:
        deadline = time.monotonic() + 20
        while len([i for i in injections if i.accepted]) < 50 and time.monotonic() < deadline:
            if failures:
                break
            # AUTH as the default user (no password set: any password is accepted),
            # as a renewed IAM login does; and a PING.
            injections.append(Injection(proxy, target, (b"AUTH", b"default", b"renewed")))
            injections.append(Injection(proxy, target, (b"PING",)))
            time.sleep(0.002)
    finally:
        stop.set()
        worker.join(20)
    assert not failures, failures
    accepted = [i for i in injections if i.accepted]
    assert len(accepted) >= 50
    assert all(i.result() for i in accepted)
    assert rounds[0] >= 2
    # the client is still in step afterwards
    assert r.echo("after") == b"after"
    r.close()
    stats = proxy.finished(1)[0]
    assert stats.replies == stats.commands  # injected replies are not counted as theirs


def test_inject_waits_for_a_half_forwarded_command(proxy: ThreadedProxy) -> None:
    raw = RawClient(proxy.port)
    raw.send(cmd("PING"))
    assert raw.read() == "PONG"
    target = session(proxy)
    value = b"v" * 200_000
    whole = cmd("SET", "big", value)
    head = whole[:50_000]
    raw.send(head)
    received(proxy, target, len(cmd("PING")) + len(head))
    assert not Injection(proxy, target, (b"PING",)).accepted
    raw.send(whole[50_000:])
    assert raw.read() == "OK"
    injection = Injection(proxy, target, (b"PING",))
    assert injection.accepted and injection.result()
    raw.send(cmd("STRLEN", "big"))
    assert raw.read() == len(value)
    raw.close()


def test_inject_refused_inside_multi(proxy: ThreadedProxy) -> None:
    raw = RawClient(proxy.port)
    raw.send(cmd("MULTI"))
    assert raw.read() == "OK"
    target = session(proxy)
    assert not Injection(proxy, target, (b"AUTH", b"default", b"x")).accepted
    raw.send(cmd("SET", "t", "1") + cmd("EXEC"))
    assert raw.read() == "QUEUED"
    assert raw.read() == ["OK"]
    injection = Injection(proxy, target, (b"AUTH", b"default", b"x"))
    assert injection.accepted and injection.result()
    raw.send(cmd("GET", "t"))
    assert raw.read() == b"1"
    raw.close()


def test_inject_refused_in_resp2_subscribed_mode_and_after_monitor(proxy: ThreadedProxy) -> None:
    raw = RawClient(proxy.port)
    raw.send(cmd("SUBSCRIBE", "news"))
    assert raw.read() == [b"subscribe", b"news", 1]
    target = session(proxy)
    assert not Injection(proxy, target, (b"PING",)).accepted
    raw.send(cmd("UNSUBSCRIBE"))
    assert raw.read() == [b"unsubscribe", b"news", 0]
    injection = Injection(proxy, target, (b"PING",))
    assert injection.accepted and injection.result()
    raw.send(cmd("MONITOR"))
    assert raw.read() == "OK"
    assert not Injection(proxy, target, (b"PING",)).accepted
    raw.close()


def test_inject_in_resp3_subscribed_mode_keeps_messages(
    proxy: ThreadedProxy, node: ValkeyNode
) -> None:
    raw = RawClient(proxy.port)
    raw.send(cmd("HELLO", "3"))
    assert isinstance(raw.read(), dict)
    raw.send(cmd("SUBSCRIBE", "news"))
    assert raw.read() == ("push", [b"subscribe", b"news", 1])
    target = session(proxy)
    publisher = redis.Redis(port=node.port)
    results = []
    for i in range(20):
        publisher.publish("news", f"m{i}")
        injection = Injection(proxy, target, (b"AUTH", b"default", b"x"))
        assert injection.accepted
        results.append(injection)
    assert all(i.result() for i in results)
    for i in range(20):
        assert raw.read() == ("push", [b"message", b"news", f"m{i}".encode()])
    raw.send(cmd("PING"))
    assert raw.read() == "PONG"
    publisher.close()
    raw.close()


def test_error_reply_calls_back_false_and_stays_hidden(proxy: ThreadedProxy) -> None:
    raw = RawClient(proxy.port)
    raw.send(cmd("SET", "a", "1"))
    assert raw.read() == "OK"
    target = session(proxy)
    injection = Injection(proxy, target, (b"AUTH", b"nosuchuser", b"wrong"))
    assert injection.accepted
    assert injection.result() is False
    raw.send(cmd("GET", "a") + cmd("PING"))
    assert raw.read() == b"1"
    assert raw.read() == "PONG"
    raw.close()
