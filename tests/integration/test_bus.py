"""The registry client against a real nats-server."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from bus import Bus, BusUnavailable, DatabaseResource, DatabaseSpec, Metadata, subjects
from bus.client import when_jetstream_answers
from bus.errors import JetStreamUnavailable
from bus.server import NatsServer, wait_port_free
from bus.specs import BUCKETS, SPECS
from bus.watch import Event
from sandbox.ports import free_port


def db(name: str, **labels: str) -> DatabaseResource:
    return DatabaseResource(
        metadata=Metadata(name=name, labels=labels), spec=DatabaseSpec(uri=f"{name}:6379")
    )


async def next_events(it: object, n: int) -> list[Event[DatabaseResource]]:
    out = []
    for _ in range(n):
        out.append(await asyncio.wait_for(it.__anext__(), 10))  # type: ignore[attr-defined]
    return out


async def test_put_get_delete_list(bus: Bus) -> None:
    await bus.put_resource(db("b", env="dev"))
    await bus.put_resource(db("a", env="prod"))
    got = await bus.get_resource("a")
    assert got is not None and got.metadata.labels == {"env": "prod"}
    assert [r.name for r in await bus.list_resources()] == ["a", "b"]
    await bus.delete_resource("a")
    assert await bus.get_resource("a") is None
    assert [r.name for r in await bus.list_resources()] == ["b"]


async def test_compare_and_set_writes_lose_to_a_newer_revision_without_error(bus: Bus) -> None:
    from bus import leases

    bucket, key = subjects.DATABASES_BUCKET, "a"
    first = await leases.create(bus, bucket, key, db("a"))
    assert first is not None
    assert await leases.create(bus, bucket, key, db("a", v="2")) is None
    second = await leases.update(bus, bucket, key, db("a", v="2"), last=first)
    assert second is not None
    assert await leases.update(bus, bucket, key, db("a", v="3"), last=first) is None
    assert await leases.delete(bus, bucket, key, last=first) is False  # moved on: kept
    found = await leases.snapshot(bus, bucket, DatabaseResource)
    assert {k: (v.record.metadata.labels, v.revision) for k, v in found.items()} == {
        "a": ({"v": "2"}, second)
    }
    assert await leases.delete(bus, bucket, key, last=second) is True
    assert await bus.get_resource("a") is None
    assert await leases.create(bus, bucket, key, db("a")) is not None  # over the marker


async def test_a_list_of_servers_connects_to_one_that_answers(nats_server: NatsServer) -> None:
    with socket.socket() as closed:  # a port nobody listens on: the first server is down
        closed.bind(("127.0.0.1", 0))
        down = f"nats://127.0.0.1:{closed.getsockname()[1]}"
    bus = await Bus.connect(f"{down}, {nats_server.url}", name="list", connect_timeout=2)
    try:
        assert bus.nc.is_connected
        assert bus.nc.connected_url is not None
        assert bus.nc.connected_url.port == nats_server.port
    finally:
        await bus.close()


async def test_provision_is_idempotent(bus: Bus, nats_server: NatsServer) -> None:
    await bus.put_resource(db("kept"))
    other = await Bus.connect(nats_server.url, name="second")
    try:
        await other.provision()
        await other.provision()
        assert [r.name for r in await other.list_resources()] == ["kept"]
    finally:
        await other.close()


async def test_every_bucket_is_created_with_its_spec_whoever_opens_it_first(
    nats_server: NatsServer,
) -> None:
    """One static registry of bucket specs: a plain ``Bus.bucket`` creates any bucket of
    the bus with its history and expiry, whatever module the opener imported."""
    fresh = await Bus.connect(nats_server.url, name="first")
    try:
        assert set(BUCKETS) < set(SPECS)
        for spec in SPECS.values():
            await asyncio.wait_for(fresh.bucket(spec.name), 10)
            config = (await fresh.js.stream_info(f"KV_{spec.name}")).config
            assert (config.description, config.max_msgs_per_subject) == (
                spec.description,
                spec.history,
            ), spec.name
            assert (config.max_age or None) == spec.ttl, spec.name
            assert config.subject_delete_marker_ttl == spec.marker_ttl, spec.name
    finally:
        await fresh.close()


async def test_unknown_fields_and_newer_versions_are_read(bus: Bus) -> None:
    kv = await bus.bucket(subjects.DATABASES_BUCKET)
    await kv.put(
        "future",
        b'{"schema_version": 9, "kind": "db", "new_thing": {"x": 1},'
        b' "metadata": {"name": "future", "labels": {"a": "b"}, "colour": "red"},'
        b' "spec": {"uri": "h:1", "protocol": "redis", "shiny": true}}',
    )
    await kv.put("garbage", b"not json")
    found = {r.name: r for r in await bus.list_resources()}
    assert set(found) == {"future"}
    assert found["future"].schema_version == 9
    assert found["future"].metadata.labels == {"a": "b"}


async def test_watch_snapshot_synced_then_changes(bus: Bus) -> None:
    await bus.put_resource(db("one"))
    await bus.put_resource(db("two"))
    it = bus.watch_resources().__aiter__()
    first = await next_events(it, 3)
    assert sorted((e.kind, e.key) for e in first[:2]) == [("upsert", "one"), ("upsert", "two")]
    assert first[2].kind == "synced"
    await bus.put_resource(db("three"))
    await bus.delete_resource("one")
    live = await next_events(it, 2)
    assert [(e.kind, e.key) for e in live] == [("upsert", "three"), ("deleted", "one")]
    await it.aclose()


async def test_watch_of_empty_bucket_syncs(bus: Bus) -> None:
    it = bus.watch_resources().__aiter__()
    assert [e.kind for e in await next_events(it, 1)] == ["synced"]
    await it.aclose()


async def test_watch_survives_nats_restart_without_loss_or_duplicates(
    nats_server: NatsServer,
) -> None:
    reader = await Bus.connect(nats_server.url, name="reader", reconnect_wait=0.1)
    try:
        await reader.provision()
        await reader.put_resource(db("stays"))
        await reader.put_resource(db("goes"))
        it = reader.watch_resources().__aiter__()
        assert [e.kind for e in await next_events(it, 3)][-1] == "synced"

        port = nats_server.port
        nats_server.stop()
        wait_port_free("127.0.0.1", port)
        # While the reader is away: a write and a delete by someone else.
        nats_server.port = port
        nats_server.start()
        writer = await Bus.connect(nats_server.url, name="writer")
        await writer.put_resource(db("new-while-away"))
        await writer.delete_resource("goes")
        await writer.close()

        events = await next_events(it, 3)
        assert sorted((e.kind, e.key) for e in events if e.kind != "synced") == [
            ("deleted", "goes"),
            ("upsert", "new-while-away"),
        ]
        assert events[-1].kind == "synced"
        # Live changes still flow after the resync, exactly once each.
        writer = await Bus.connect(nats_server.url, name="writer2")
        await writer.put_resource(db("after"))
        await writer.close()
        (event,) = await next_events(it, 1)
        assert (event.kind, event.key) == ("upsert", "after")
        assert reader.reconnects >= 1
        await it.aclose()
    finally:
        await reader.close()


async def test_connect_waits_for_a_starting_server_but_not_forever(tmp_path: Path) -> None:
    port = free_port()  # nobody listening on it
    url = f"nats://user:secret@127.0.0.1:{port}"
    with pytest.raises(BusUnavailable) as refused:
        await Bus.connect(url, name="nobody-there")
    assert f"cannot reach NATS at nats://user:***@127.0.0.1:{port}" in str(refused.value)
    assert "secret" not in str(refused.value)

    server = NatsServer(tmp_path / "late", port=port)
    later = asyncio.get_running_loop().call_later(0.5, server.start)
    try:
        bus = await Bus.connect(f"nats://127.0.0.1:{port}", name="patient", wait=10)
        await bus.close()
    finally:
        later.cancel()
        server.stop()


async def test_a_start_waits_for_jetstream_to_answer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A process's start sets up its buckets; JetStream that does not answer yet (a leaf
    node's link being made, a leader election, a replicated stream being created on a
    busy cluster: an agent of the sandbox once stopped at start on one lost answer) is
    asked again, and the start goes on once it answers."""
    port = free_port()
    plain = NatsServer(tmp_path / "plain", port=port, jetstream=False).start()
    bus = await Bus.connect(plain.url, name="starting", reconnect_wait=0.1)
    started = asyncio.ensure_future(
        when_jetstream_answers(
            lambda: bus.provision(BUCKETS[subjects.DATABASES_BUCKET]),
            wait=30,
            what="setting up the buckets",
        )
    )
    js = NatsServer(tmp_path / "js", port=port)
    try:
        await asyncio.sleep(2)
        assert not started.done()  # no JetStream yet: it keeps asking
        plain.stop()
        await asyncio.to_thread(wait_port_free, "127.0.0.1", port)
        js.start()  # the same address, now with JetStream
        await asyncio.wait_for(started, 30)
        assert (await bus.js.stream_info("KV_" + subjects.DATABASES_BUCKET)).config.name
        warnings = [r.getMessage() for r in caplog.records if "trying again" in r.getMessage()]
        assert len(warnings) == 1, warnings  # said once, not per try
        assert "setting up the buckets: no JetStream" in warnings[0]
    finally:
        started.cancel()
        await bus.close()
        plain.stop()
        js.stop()


async def test_a_start_gives_up_on_jetstream_that_never_answers(tmp_path: Path) -> None:
    plain = NatsServer(tmp_path / "plain", jetstream=False).start()
    bus = await Bus.connect(plain.url, name="starting")
    loop = asyncio.get_running_loop()
    began = loop.time()
    try:
        with pytest.raises(JetStreamUnavailable) as refused:
            await when_jetstream_answers(
                lambda: bus.provision(BUCKETS[subjects.DATABASES_BUCKET]),
                wait=2,
                what="setting up the buckets",
            )
        assert loop.time() - began >= 1.0  # it did ask again
        assert f"no JetStream answers at {plain.url}" in str(refused.value)
        assert "start nats-server with -js" in str(refused.value)
    finally:
        await bus.close()
        plain.stop()


class _EarlyMarkerWatcher:
    """nats-py's watcher as it behaves in a race seen under load: the end-of-snapshot
    marker (None) comes before an entry the server had already sent."""

    def __init__(self, entries: list[object]) -> None:
        self._items: list[object] = [None, *entries]
        self._sent = len(entries)
        self._sub = self

    async def consumer_info(self) -> object:
        delivered = type("Delivered", (), {"consumer_seq": self._sent})()
        return type("Info", (), {"delivered": delivered})()

    def __aiter__(self) -> _EarlyMarkerWatcher:
        return self

    async def __anext__(self) -> object:
        if not self._items:
            await asyncio.Event().wait()  # a live watch: nothing more, ever
        return self._items.pop(0)

    async def stop(self) -> None:
        return None


async def test_watch_waits_for_entries_sent_before_an_early_end_marker() -> None:
    from nats.js.kv import KeyValue

    from bus.watch import KvWatch

    entry = KeyValue.Entry(
        bucket="b", key="orders", value=b"x", revision=7, delta=0, created=None, operation=None
    )

    class Bucket:
        async def watch(self, keys: str, **options: object) -> _EarlyMarkerWatcher:
            return _EarlyMarkerWatcher([entry])

    async def open_bucket() -> Bucket:
        return Bucket()

    watch: KvWatch[bytes] = KvWatch(
        open_bucket=open_bucket,  # type: ignore[arg-type]
        keys=">",
        decode=lambda key, data: data,
    )
    it = watch.__aiter__()
    first = await asyncio.wait_for(it.__anext__(), 5)
    assert (first.kind, first.key, first.value) == ("upsert", "orders", b"x")
    assert (await asyncio.wait_for(it.__anext__(), 5)).kind == "synced"
    await watch.stop()


@pytest.mark.leaks(
    "nats-py's subscription task can miss its own cancellation (Python 3.11 wait_for) "
    "when stopped as its first message arrives; the test checks every other task",
    tasks_only=True,
)
async def test_a_task_reading_snapshots_stops_when_cancelled_at_any_moment(bus: Bus) -> None:
    """A root task that reads the registry (as the managed-user service's sweep does)
    ends when it is cancelled, wherever the cancellation lands: while nats-py waits for a
    reply (Python 3.11's wait_for drops a cancellation that meets the reply), or while a
    finished snapshot's watch is being closed. Before, such a task went on reading
    (the agent's stop, and SIGTERM, waited forever) and each interrupted close left its
    consumer's tasks running; nothing is left behind now but nats-py's own."""
    await bus.put_resource(db("a"))
    before = asyncio.all_tasks()

    async def reader() -> None:
        while True:
            await bus.list_resources()

    loop = asyncio.get_running_loop()
    for n in range(100):  # a snapshot takes 1-2 ms: cancel at every moment of one
        task = loop.create_task(reader())
        await asyncio.sleep(0.0002 * (n % 25))
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=3)
        if not done:
            task.cancel()  # once more, not to leave it running
            await asyncio.wait([task], timeout=3)
            pytest.fail(f"round {n}: the task went on after its cancellation")
        assert task.cancelled(), task
    await asyncio.sleep(0.2)
    left = [
        t.get_coro()
        for t in asyncio.all_tasks() - before
        if not t.done() and t is not asyncio.current_task()
    ]
    ours = [c for c in left if getattr(c, "__qualname__", "") != "Subscription._wait_for_msgs"]
    assert not ours, ours
    assert len(left) <= 5, left
