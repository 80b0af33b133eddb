"""Discovery replicas: one lease per fetcher in a real nats-server, AWS from moto.

Each "replica" here is its own NATS connection, its own :class:`Leases` and its own
AWS session (so AWS calls are counted per replica), in one process; a replica dies by
stopping its leases without releasing them, is paused by holding its poll at our own
seam (the fetch) while its leases stop being renewed, and is cut off from NATS by a TCP
link the test closes. The same with real processes
and signals is in tests/e2e/test_discovery_replicas.py.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import pytest

from bus import Bus, subjects
from bus import leases as cas
from bus.schemas import DatabaseResource, DiscoveryLease, FetcherStatus
from bus.server import NatsServer
from discovery import poller as poller_module
from discovery.aws.session import AwsSession
from discovery.lease import Leases, lease_clock
from discovery.matchers import expand, status_key_of
from discovery.poller import Poller
from discovery.settings import DiscoveryService
from sandbox.aws import MotoServer
from tests.kits import seed

ACCOUNT = "123456789012"
PERIOD = 2.0
"""The lease period of tests that wait for a takeover."""
STEADY = 15.0
"""The lease period of tests where no lease may change hands: long enough that a loaded
machine (a blocking call of the test, moto in this process) never delays a renewal
past it."""
REGIONS = ("us-east-1", "eu-west-1", "ap-south-1")


def settings(*matchers: dict[str, Any], period: float = PERIOD) -> DiscoveryService:
    return DiscoveryService.model_validate(
        {"aws": list(matchers), "lease": {"period": period}, "poll_interval": 60}
    )


def matcher(*regions: str, **extra: Any) -> dict[str, Any]:
    return {"types": ["memorydb"], "regions": list(regions), **extra}


class Replica:
    def __init__(self, bus: Bus, cfg: DiscoveryService, name: str) -> None:
        self.bus = bus
        self.session = AwsSession(max_attempts=2)
        self.leases = Leases(
            bus,
            group=cfg.discovery_group,
            period=cfg.lease.period,
            wanted={k.status_key for k in expand(cfg.aws)},
            replica=name,
        )
        self.poller = Poller(settings=cfg, bus=bus, session=self.session, leases=self.leases)


@pytest.fixture
async def replicas(
    aws: MotoServer, nats_server: NatsServer
) -> AsyncIterator[Callable[[DiscoveryService, str], Awaitable[Replica]]]:
    """replica(config, name) -> a started replica on its own NATS connection."""
    async with AsyncExitStack() as stack:

        async def start(cfg: DiscoveryService, name: str) -> Replica:
            bus = await Bus.connect(nats_server.url, name=name)
            stack.push_async_callback(bus.close)
            await bus.provision()
            replica = Replica(bus, cfg, name)
            stack.push_async_callback(replica.leases.stop)
            await replica.leases.start()
            return replica

        yield start


async def wait_for(check: Callable[[], bool], limit: float = 20.0) -> float:
    """Seconds until ``check()`` held (fails after ``limit`` seconds)."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < limit, "timed out"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def resources(bus: Bus) -> dict[str, DatabaseResource]:
    return {r.name: r for r in await bus.list_resources()}


async def test_each_fetcher_is_polled_by_exactly_one_replica(
    replicas: Any, caplog: pytest.LogCaptureFixture
) -> None:
    for region in REGIONS:
        seed.cluster(region, f"c-{region}")
    cfg = settings(matcher(*REGIONS), period=STEADY)
    a, b = await asyncio.gather(replicas(cfg, "a"), replicas(cfg, "b"))
    everything = {k.status_key for k in a.poller.fetchers}
    assert a.leases.held().isdisjoint(b.leases.held())
    assert a.leases.held() | b.leases.held() == everything

    for _ in range(2):  # two polls each, at the same time
        reports = await asyncio.gather(a.poller.poll_once(), b.poller.poll_once())
        polled = [r.key.status_key for report in reports for r in report.results]
        assert sorted(polled) == sorted(everything)  # each fetcher exactly once
        assert all(report.ok and not report.refused for report in reports)
    # AWS calls only for the fetchers each holds: nobody describes a region twice
    for replica in (a, b):
        assert (replica.session.total_calls == 0) == (not replica.leases.held())
    assert len(await resources(a.bus)) == len(REGIONS)
    assert "runs another config" not in caplog.text
    statuses = {s.fetcher: s.replica for s in await a.bus.list_fetcher_status()}
    assert statuses == {
        name: ("a" if name in a.leases.held() else "b") for name in sorted(everything)
    }


async def test_a_dead_holder_is_taken_over_within_one_period_never_before(
    replicas: Any,
) -> None:
    seed.cluster("us-east-1", "orders")
    cfg = settings(matcher(*REGIONS))
    a = await replicas(cfg, "a")
    b = await replicas(cfg, "b")
    everything = {k.status_key for k in a.poller.fetchers}
    assert a.leases.held() == everything and b.leases.held() == set()
    assert (await b.poller.poll_once()).skipped  # a standby polls nothing

    taken: dict[str, float] = {}
    a_still_writing: list[str] = []

    def took_over(names: set[str]) -> None:
        taken.update(dict.fromkeys(names, lease_clock()))  # the leases' own clock
        a_still_writing.extend(n for n in names if a.leases.holds(n))

    b.leases.on_acquired = took_over
    # a's last renewals: b may take over no earlier than a period after each was sent
    await a.leases.confirm(everything)
    a_valid = {name: a.leases._held[a.leases._key(name)].valid_until for name in everything}
    died = time.monotonic()
    await a.leases.stop(release=False)  # dies: no renewal, no release

    # held() fills during b's round; on_acquired is told at its end
    took = await wait_for(lambda: b.leases.held() == everything and set(taken) == everything)
    assert all(taken[name] >= a_valid[name] for name in everything)
    assert a_still_writing == []  # a stopped writing before b could take over
    assert took <= PERIOD + 3.0, f"takeover took {took:.2f}s with a {PERIOD}s period"
    found = await cas.snapshot(b.bus, subjects.DISCOVERY_LEASES_BUCKET, DiscoveryLease)
    assert sorted(v.record.holder for v in found.values()) == ["b"] * len(everything)
    print(f"takeover {time.monotonic() - died:.2f}s after the holder stopped (period {PERIOD}s)")


async def test_a_clean_stop_hands_over_at_once(replicas: Any) -> None:
    cfg = settings(matcher(*REGIONS))
    a = await replicas(cfg, "a")
    b = await replicas(cfg, "b")
    await a.leases.stop()  # releases
    took = await wait_for(lambda: len(b.leases.held()) == len(REGIONS))
    assert took < PERIOD / 2, f"handover after a release took {took:.2f}s"


async def test_a_paused_holder_does_not_overwrite_the_new_holders_state(
    replicas: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = seed.cluster("us-east-1", "orders", tags={"team": "a"})
    name = f"orders-memorydb-us-east-1-{ACCOUNT}"
    cfg = settings(matcher("us-east-1"))
    a = await replicas(cfg, "a")
    b = await replicas(cfg, "b")
    assert (await a.poller.poll_once()).registry_writes == 1

    # a's next poll reads the registry, fetches team=b from AWS, then pauses (our seam:
    # the fetch) while its leases stop being renewed, like a process stopped by SIGSTOP
    seed.tag("us-east-1", c["ARN"], {"team": "b"})
    fetched, resume = asyncio.Event(), asyncio.Event()
    real_fetch = poller_module.fetch

    async def paused_fetch(key: Any, **kwargs: Any) -> Any:
        result = await real_fetch(key, **kwargs)
        if kwargs["session"] is a.session:
            fetched.set()
            await resume.wait()
        return result

    monkeypatch.setattr(poller_module, "fetch", paused_fetch)
    a_poll = asyncio.create_task(a.poller.poll_once())
    await fetched.wait()
    await a.leases.stop(release=False)  # paused: renews nothing

    # b takes over and writes the newer state
    await wait_for(lambda: bool(b.leases.held()))
    seed.tag("us-east-1", c["ARN"], {"team": "c"})
    report = await b.poller.poll_once()
    assert [r.name for r in report.plan.puts] == [name]

    resume.set()  # a wakes up and goes on with its poll
    stale = await a_poll
    assert [r.name for r in stale.plan.puts] == [name]  # it still wanted to write team=b
    assert stale.refused and "lease" in stale.refused[0]
    got = (await resources(a.bus))[name]
    assert got.metadata.labels["team"] == "c"
    (status,) = await a.bus.list_fetcher_status()
    assert status.replica == "b"


async def test_the_registry_refuses_a_write_made_after_a_pause_past_the_lease_check(
    replicas: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last layer: a holder paused *after* its lease check (it believes it still
    holds the lease) still cannot overwrite or delete what the new holder wrote."""
    c = seed.cluster("us-east-1", "orders", tags={"team": "a"})
    seed.cluster("us-east-1", "carts")
    orders, carts = (f"{n}-memorydb-us-east-1-{ACCOUNT}" for n in ("orders", "carts"))
    cfg = settings(matcher("us-east-1"))
    a = await replicas(cfg, "a")
    b = await replicas(cfg, "b")
    assert (await a.poller.poll_once()).registry_writes == 2

    seed.tag("us-east-1", c["ARN"], {"team": "b"})
    seed.delete("us-east-1", "carts")
    fetched, resume = asyncio.Event(), asyncio.Event()
    real_fetch = poller_module.fetch

    async def paused_fetch(key: Any, **kwargs: Any) -> Any:
        result = await real_fetch(key, **kwargs)
        if kwargs["session"] is a.session:
            fetched.set()
            await resume.wait()
        return result

    monkeypatch.setattr(poller_module, "fetch", paused_fetch)
    a_poll = asyncio.create_task(a.poller.poll_once())
    await fetched.wait()
    await a.leases.stop(release=False)
    await wait_for(lambda: bool(b.leases.held()))
    # carts comes back in AWS (same name) and b writes both entries anew
    seed.cluster("us-east-1", "carts", tags={"back": "yes"})
    seed.tag("us-east-1", c["ARN"], {"team": "c"})
    assert (await b.poller.poll_once()).registry_writes == 2

    # a's lease checks pass as if it had been paused right after them
    async def still_held(names: Any) -> set[str]:
        return set(names)

    monkeypatch.setattr(a.leases, "confirm", still_held)
    monkeypatch.setattr(a.leases, "holds", lambda name: True)
    resume.set()
    stale = await a_poll
    assert sorted(r.name for r in stale.plan.puts) == [orders]
    assert stale.plan.deletes == [carts]
    assert len(stale.refused) >= 2
    assert all("since this poll read it" in r or "someone else" in r for r in stale.refused)
    now = await resources(a.bus)
    assert now[orders].metadata.labels["team"] == "c"
    assert now[carts].metadata.labels["back"] == "yes"  # not deleted by the paused one


async def test_replicas_that_disagree_on_the_config_never_delete_each_others_entries(
    replicas: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A rolling change of the config: old replica a has matcher 'prod', new replica b
    matcher 'all'. Each sees the other's entries as orphans; neither deletes them while
    the other holds their fetcher's lease. Once a stops, b cleans up a's fetcher."""
    seed.cluster("us-east-1", "orders", tags={"env": "prod"})
    seed.cluster("us-east-1", "devbox", tags={"env": "dev"})
    old = settings(matcher("us-east-1", tags={"env": "prod"}), period=STEADY)
    new = settings(matcher("us-east-1", tags={"env": ["prod", "dev"]}), period=STEADY)
    a = await replicas(old, "a")
    b = await replicas(new, "b")
    # each says so once
    await wait_for(lambda: caplog.text.count("runs another config") == 2)
    assert "replica a of discovery group '' runs another config" in caplog.text
    assert "replica b of discovery group '' runs another config" in caplog.text
    assert (await a.poller.poll_once()).ok
    assert (await b.poller.poll_once()).ok
    # both fetchers name orders: the first writer keeps it, the other says why
    written = set(await resources(a.bus))
    assert written == {
        f"orders-memorydb-us-east-1-{ACCOUNT}",
        f"devbox-memorydb-us-east-1-{ACCOUNT}",
    }
    for _ in range(3):
        ra, rb = await asyncio.gather(a.poller.poll_once(), b.poller.poll_once())
        assert ra.plan.deletes == [] and rb.plan.deletes == []
        assert set(await resources(a.bus)) == written

    await a.leases.stop()  # a is replaced by a replica with the new config: b adopts
    report = await b.poller.poll_once()
    assert report.ok and not report.refused
    mine = b.poller.fetchers[0].status_key
    now = await resources(b.bus)
    assert set(now) == written
    assert {status_key_of(r.origin.fetcher_id) for r in now.values() if r.origin} == {mine}
    assert b.leases.held() == {mine}  # the orphan's lease was released again


async def test_status_names_the_replica_and_lease_records_the_holder(replicas: Any) -> None:
    seed.cluster("us-east-1", "orders")
    cfg = settings(matcher("us-east-1"), period=STEADY)
    a = await replicas(cfg, "host-1-abc")
    await a.poller.poll_once()
    (status,) = await a.bus.list_fetcher_status()
    assert isinstance(status, FetcherStatus) and status.replica == "host-1-abc"
    leases = await cas.snapshot(a.bus, subjects.DISCOVERY_LEASES_BUCKET, DiscoveryLease)
    assert [v.record.holder for v in leases.values()] == ["host-1-abc"]
    assert [v.record.period for v in leases.values()] == [STEADY]


class Link:
    """A TCP link from a client to nats-server that the test can cut and restore."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.server: asyncio.Server | None = None
        self.pipes: set[asyncio.Task[None]] = set()
        self.writers: set[asyncio.StreamWriter] = set()

    async def up(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in list(self.writers):
            writer.close()
        for pipe in list(self.pipes):
            pipe.cancel()
        await asyncio.gather(*self.pipes, return_exceptions=True)
        await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        for task in (
            asyncio.create_task(pipe(reader, up_writer)),
            asyncio.create_task(pipe(up_reader, writer)),
        ):
            self.pipes.add(task)
            task.add_done_callback(self.pipes.discard)


async def test_a_holder_cut_off_from_nats_stops_writing_before_it_is_taken_over(
    aws: MotoServer, nats_server: NatsServer, replicas: Any
) -> None:
    seed.cluster("us-east-1", "orders")
    cfg = settings(matcher("us-east-1"))
    link = Link(nats_server.port)
    await link.up()
    bus = await Bus.connect(f"nats://127.0.0.1:{link.port}", name="a", reconnect_wait=0.2)
    a = Replica(bus, cfg, "a")
    try:
        await a.leases.start()
        b = await replicas(cfg, "b")
        assert (await a.poller.poll_once()).registry_writes == 1
        name = a.poller.fetchers[0].status_key
        a_stopped: list[float] = []  # when a no longer writes
        b_took: list[float] = []
        b.leases.on_acquired = lambda names: b_took.append(time.monotonic())

        cut = time.monotonic()
        await link.cut()
        await wait_for(lambda: not a.leases.holds(name))
        a_stopped.append(time.monotonic())
        await wait_for(lambda: bool(b_took))
        assert a_stopped[0] <= b_took[0]
        print(
            f"\ncut off at 0s: a stopped writing at {a_stopped[0] - cut:.2f}s, "
            f"b took over at {b_took[0] - cut:.2f}s (period {PERIOD}s)"
        )
        assert (await b.poller.poll_once()).ok

        await link.up()  # a comes back: it learns it lost the lease, and writes nothing
        await wait_for(lambda: a.bus.reconnects >= 1)
        report = await a.poller.poll_once()
        assert report.results == [] and report.registry_writes == 0 and report.skipped
        assert a.leases.held() == set() and a.leases.holder_of(name) == "b"
        (status,) = await b.bus.list_fetcher_status()
        assert status.replica == "b"
    finally:
        await a.leases.stop()
        await bus.close()
        await link.cut()


async def test_never_two_writers_for_one_fetcher_while_replicas_come_and_go(
    nats_server: NatsServer,
) -> None:
    """Replicas started, cut off (they stop renewing but are still asked whether they
    may write, like a paused process or one that lost NATS) or stopped (release) at
    random, a 1s period: sampled every few milliseconds, no fetcher ever has two
    replicas that may write for it, and every fetcher has a holder again at the end."""
    rng = random.Random(19)
    names = {f"memorydb.r{i}.d" for i in range(4)}
    live: list[Leases] = []
    cut_off: list[Leases] = []
    buses: list[Bus] = []
    overlaps: list[str] = []
    next_id = 0

    async def start() -> None:
        nonlocal next_id
        bus = await Bus.connect(nats_server.url, name=f"r{next_id}")
        buses.append(bus)
        leases = Leases(bus, group="g", period=1.0, wanted=names, replica=f"r{next_id}")
        next_id += 1
        await leases.start()
        live.append(leases)

    async def sample(until: float) -> None:
        while lease_clock() < until:
            for name in names:
                writers = [x.replica for x in live + cut_off if x.holds(name)]
                if len(writers) > 1:
                    overlaps.append(f"{name}: {writers}")
            await asyncio.sleep(0.005)

    try:
        for _ in range(3):
            await start()
        sampler = asyncio.create_task(sample(lease_clock() + 10))
        for _ in range(6):
            await asyncio.sleep(rng.uniform(0.3, 1.5))
            gone = max(live, key=lambda x: len(x.held()))  # a holder: the case that counts
            live.remove(gone)
            if rng.random() < 0.5:
                await gone.stop()
            else:
                await gone.stop(release=False)
                cut_off.append(gone)
            await start()
        await sampler
        assert overlaps == []
        await wait_for(lambda: set().union(*(x.held() for x in live)) == names, limit=5)
    finally:
        for leases in live:
            await leases.stop()
        for bus in buses:
            await bus.close()
