"""The "hub server lost" fault with real processes: a hub of 3 nats-servers (R3), two
regions behind leaf nodes, and the bus's users at work through the leaves: discovery-like
registry writes, agent-like watches in both regions, audit publishes, and two agents
racing compare-and-set rounds like managed rotation leases. One hub server is SIGKILLed
(the one a region's leaf is linked to), then started again.

Nothing may be lost or doubled: every acknowledged registry write is there and every
watch saw it once, every audit event is stored once, no compare-and-set round is won
twice, and the restarted server catches up with the others. The figures are printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest
from pydantic import BaseModel

from bus import Bus, DatabaseResource, DatabaseSpec, Metadata, leases, subjects
from bus.audit import SessionStart, ensure_audit_stream, publish_event, read_events
from bus.client import FAILURES, kv_stream_name
from bus.servers import DbServerHeartbeat
from bus.specs import Replication
from fleetgate.cli.jetstream import provision
from tests.kits.agent import running_agent, wait_until
from tests.kits.listener import APP_PASSWORD, RawSession, add_acl_users, make_fleet, static_db
from tests.kits.natscluster import NatsTopology, Node
from tests.kits.proxy import serve_single_node

T = TypeVar("T")
REGIONS = ("us-east-1", "eu-west-1")
R3 = Replication(3)
PAUSE = 0.02
"""Between two operations of one worker: a few hundred of each in the test."""


class Round(BaseModel):
    holder: str
    round: int


@dataclass
class Worker:
    """One client's tally: operations acknowledged, attempts that failed, and the longest
    time without an acknowledgement (how long the fault stalled it)."""

    name: str
    ok: int = 0
    failed: int = 0
    longest_stall: float = 0.0
    last_ok: float = field(default_factory=time.monotonic)

    def succeeded(self) -> None:
        now = time.monotonic()
        self.longest_stall = max(self.longest_stall, now - self.last_ok)
        self.last_ok = now
        self.ok += 1

    def line(self) -> str:
        return (
            f"  {self.name:<34} {self.ok:>6} ok {self.failed:>5} failed attempts, "
            f"longest stall {self.longest_stall:5.2f}s"
        )


def db(name: str) -> DatabaseResource:
    return DatabaseResource(metadata=Metadata(name=name), spec=DatabaseSpec(uri=f"{name}:6379"))


async def until_ok(worker: Worker, call: Callable[[], Awaitable[T]]) -> T:
    """Retry one operation until it is acknowledged, counting the failed attempts."""
    while True:
        try:
            result = await call()
        except FAILURES:
            worker.failed += 1
            await asyncio.sleep(0.05)
            continue
        worker.succeeded()
        return result


@pytest.fixture
def topo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NatsTopology]:
    topology = NatsTopology(tmp_path / "nats", regions=REGIONS)
    topology.trust(monkeypatch)
    with topology:
        yield topology


async def bus_at(url: str, name: str) -> Bus:
    bus = await Bus.connect(url, name=name, request_timeout=1.0)
    bus.replication = R3
    return bus


def copies(topo: NatsTopology, stream: str) -> list[tuple[str, int, int]]:
    """(server, messages, last sequence) of every hub server's copy of a stream."""
    out = []
    for hub in topo.hub_nodes:
        state = hub.stream_state(stream) or {}
        out.append((hub.name, int(state.get("messages", -1)), int(state.get("last_seq", -1))))
    return out


async def test_losing_a_hub_server_loses_nothing(
    topo: NatsTopology, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await provision(topo.hub_urls("admin"), R3, migrate=False) == 0
    discovery = await bus_at(topo.leaf_url("eu-west-1", "discovery"), "discovery")
    agents = {region: await bus_at(topo.leaf_url(region, "agent"), region) for region in REGIONS}
    auditor = await Bus.connect(topo.hub_urls("auditor"), name="auditor")
    buses = [discovery, *agents.values(), auditor]
    for agent in agents.values():
        await ensure_audit_stream(agent, update=False)
    stop = asyncio.Event()

    # -- the workload ------------------------------------------------------------------
    written: dict[str, int] = {}
    writes = Worker("registry writes (eu-west-1)")

    async def write() -> None:
        n = 0
        while not stop.is_set():
            name = f"db-{n:04d}"
            key = subjects.database_key(name)
            record = db(name)
            written[key] = await until_ok(writes, lambda r=record: discovery.put_resource(r))
            acked_at[key] = time.monotonic()
            n += 1
            await asyncio.sleep(PAUSE)

    seen: dict[str, Counter[tuple[str, int]]] = {region: Counter() for region in REGIONS}
    acked_at: dict[str, float] = {}
    seen_at: dict[str, dict[str, float]] = {region: {} for region in REGIONS}
    synced: dict[str, int] = dict.fromkeys(REGIONS, 0)

    async def watch(region: str) -> None:
        async for event in agents[region].watch_resources():
            if event.kind == "upsert":
                seen[region][(event.key, event.revision)] += 1
                seen_at[region].setdefault(event.key, time.monotonic())
            elif event.kind == "synced":
                synced[region] += 1

    published: list[str] = []
    audits = Worker("audit publishes (us-east-1)")

    async def audit() -> None:
        n = 0
        while not stop.is_set():
            event = SessionStart(user="alice", database=f"db-{n}", host_id="h1")
            await until_ok(audits, lambda e=event: publish_event(agents["us-east-1"], e))
            published.append(event.id)
            n += 1
            await asyncio.sleep(PAUSE)

    won: list[tuple[int, str]] = []
    cas = {region: Worker(f"compare-and-set ({region})") for region in REGIONS}
    lease = (subjects.LEASES_BUCKET, "rotation.orders")

    async def contend(region: str) -> None:
        agent, worker = agents[region], cas[region]
        while not stop.is_set():
            try:
                current = await leases.read(agent, *lease, Round)
                if current is None:
                    rev = await leases.create(agent, *lease, Round(holder=region, round=1))
                    next_round = 1
                else:
                    next_round = current.record.round + 1
                    rev = await leases.update(
                        agent, *lease, Round(holder=region, round=next_round), last=current.revision
                    )
            except FAILURES:
                worker.failed += 1
                await asyncio.sleep(0.05)
                continue
            worker.succeeded()
            if rev is not None:
                won.append((next_round, region))
            await asyncio.sleep(PAUSE)

    tasks = [
        asyncio.create_task(write()),
        asyncio.create_task(audit()),
        *(asyncio.create_task(watch(region)) for region in REGIONS),
        *(asyncio.create_task(contend(region)) for region in REGIONS),
    ]
    try:
        await asyncio.sleep(1.5)
        # -- the fault: SIGKILL the hub server us-east-1's leaf is linked to -------------
        victim = linked_hub(topo, "us-east-1")
        roles = hub_roles(topo, victim)
        killed_at = time.monotonic()
        topo.kill(victim)
        await asyncio.sleep(4.0)
        restart_began = time.monotonic()
        await asyncio.to_thread(topo.restart, victim)
        back_in = time.monotonic() - restart_began
        await asyncio.sleep(2.0)
        stop.set()
        workers = tasks[:2] + tasks[4:]
        await asyncio.wait_for(asyncio.gather(*workers), 30)

        # -- nothing lost, nothing doubled -----------------------------------------------
        final = await discovery.snapshot(subjects.DATABASES_BUCKET, DatabaseResource)
        lost = [key for key in written if key not in final]
        with contextlib.suppress(AssertionError):  # the figures below say what is missing
            await wait_until(
                lambda: all(
                    (key, rev) in seen[region] for key, rev in written.items() for region in REGIONS
                ),
                20,
            )
        missed = {
            region: [key for key, rev in written.items() if (key, rev) not in seen[region]]
            for region in REGIONS
        }
        doubled = {
            region: sum(1 for count in seen[region].values() if count > 1) for region in REGIONS
        }
        stored = [event.id async for event in read_events(auditor)]
        audit_lost = set(published) - set(stored)
        audit_doubled = len(stored) - len(set(stored))
        rounds = Counter(round_ for round_, _ in won)
        double_wins = [round_ for round_, count in rounds.items() if count > 1]

        # -- the restarted server catches up --------------------------------------------
        streams = [
            kv_stream_name(subjects.DATABASES_BUCKET),
            kv_stream_name(subjects.LEASES_BUCKET),
            subjects.AUDIT_STREAM,
        ]
        caught_up_in = await caught_up(topo, streams, since=restart_began)
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for bus in buses:
            await bus.close()

    with capsys.disabled():
        print(
            "\n".join(
                [
                    "",
                    f"hub server lost: SIGKILL {victim.name} ({', '.join(roles) or 'no leader'}) "
                    f"with 3 hub servers (R3) and 2 leaves; restarted after "
                    f"{restart_began - killed_at:.1f}s, back in its cluster in {back_in:.2f}s, "
                    f"caught up in {caught_up_in:.2f}s",
                    writes.line(),
                    audits.line(),
                    *(worker.line() for worker in cas.values()),
                    f"  registry entries written {len(written)}, lost {len(lost)}; watches "
                    + ", ".join(
                        f"{region}: {len(seen[region])} seen, {len(missed[region])} missed, "
                        f"{doubled[region]} doubled, {synced[region]} snapshots"
                        for region in REGIONS
                    ),
                    "  write acknowledged -> seen by the watch: "
                    + ", ".join(
                        f"{region} {delays(acked_at, seen_at[region])}" for region in REGIONS
                    ),
                    f"  audit events published {len(published)}, stored {len(stored)}, "
                    f"lost {len(audit_lost)}, duplicated {audit_doubled}",
                    f"  compare-and-set rounds won {len(won)}, won twice {len(double_wins)}",
                    "  copies after catching up: "
                    + "; ".join(f"{s}: {copies(topo, s)}" for s in streams),
                ]
            )
        )
    assert not lost
    assert missed == {region: [] for region in REGIONS}
    assert doubled == dict.fromkeys(REGIONS, 0)
    assert not audit_lost and audit_doubled == 0
    assert set(stored) == set(published)
    assert not double_wins
    assert writes.ok > 50 and audits.ok > 50 and all(w.ok > 20 for w in cas.values())


def delays(acked_at: dict[str, float], seen_at: dict[str, float]) -> str:
    """Median, 99th percentile and longest time from a write's acknowledgement to its
    watch event (negative: the event came before the writer had its ack)."""
    spans = sorted(seen_at[key] - at for key, at in acked_at.items() if key in seen_at)
    if not spans:
        return "none seen"
    pick = lambda q: spans[min(len(spans) - 1, int(q * len(spans)))]  # noqa: E731
    return f"p50 {pick(0.5) * 1000:.0f} ms, p99 {pick(0.99) * 1000:.0f} ms, max {spans[-1]:.2f}s"


def linked_hub(topo: NatsTopology, region: str) -> Node:
    name = topo.leaf_nodes[region].leaf_links()[0]["name"]
    return next(hub for hub in topo.hub_nodes if hub.name == name)


def hub_roles(topo: NatsTopology, hub: Node) -> list[str]:
    """What the server leads: the JetStream meta group, streams."""
    roles = []
    _, jsz = hub.monitor("/jsz?accounts=true&streams=true")
    if (jsz.get("meta_cluster") or {}).get("leader") == hub.name:
        roles.append("meta leader")
    for account in jsz.get("account_details") or []:
        for detail in account.get("stream_detail") or []:
            if (detail.get("cluster") or {}).get("leader") == hub.name:
                roles.append(f"leader of {detail['name']}")
    return roles


async def caught_up(topo: NatsTopology, streams: list[str], *, since: float) -> float:
    """Seconds from ``since`` until every hub server's copy of each stream is the same."""

    def same() -> bool:
        states = [copies(topo, stream) for stream in streams]
        return all(len({(m, last) for _, m, last in state}) == 1 for state in states)

    await wait_until(same, 30, "the restarted server to catch up")
    return time.monotonic() - since


@pytest.fixture
def valkey_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    for node in serve_single_node(tmp_path_factory.mktemp("valkey"), setup=add_acl_users):
        yield node.port


@pytest.mark.leaks(
    "nats-py's ordered consumers start a recreate_consumer task of their own after a "
    "server is lost and do not stop it when the client closes",
    tasks_only=True,
)
async def test_losing_a_hub_server_keeps_every_session_serving(
    topo: NatsTopology,
    tmp_path: Path,
    valkey_port: int,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Real agents behind each leaf, clients with sessions to them: while a hub server is
    killed and restarted, established sessions run their commands, new sessions open,
    no heartbeat expires and every session start is audited."""
    assert await provision(topo.hub_urls("admin"), R3, migrate=False) == 0
    admin = await bus_at(topo.hub_urls("admin"), "admin")
    victim = linked_hub(topo, "us-east-1")
    # the heartbeat observer stays on a server that lives, so it sees every renewal
    survivor = next(hub for hub in topo.hub_nodes if hub is not victim)
    reader = await Bus.connect(survivor.url("reader"), name="reader")
    auditor = await Bus.connect(topo.hub_urls("auditor"), name="auditor")
    fleet = await make_fleet(admin, tmp_path, topo.hub_urls("admin"))
    alice = fleet.identity("alice", ["dev"])
    stop = asyncio.Event()
    async with contextlib.AsyncExitStack() as stack:
        listeners, beat_keys = {}, {}
        for region in REGIONS:
            config = fleet.agent(
                f"agent-{region}",
                [static_db(f"cache-{region}", valkey_port, env="dev")],
                heartbeat={"interval": "1s", "ttl": "15s"},
            )
            config["jetstream"] = {"replicas": 3}
            agent = await stack.enter_async_context(
                running_agent(config, topo.leaf_url(region, "agent"))
            )
            assert agent.listener is not None and agent.identity is not None
            listeners[region] = agent.listener.port
            beat_keys[region] = subjects.db_server_key(f"cache-{region}", agent.identity.host_id)

        async def session(region: str) -> RawSession:
            opened = await RawSession.open(
                listeners[region], alice, fleet.ca.pem, f"cache-{region}", "app"
            )
            assert await opened.call("AUTH", "app", APP_PASSWORD) == b"+OK"
            return opened

        commands = {region: Worker(f"commands on open sessions ({region})") for region in REGIONS}
        opens = {region: Worker(f"new sessions ({region})") for region in REGIONS}
        opened_ok: dict[str, int] = dict.fromkeys(REGIONS, 0)

        async def run_commands(region: str, n: int) -> None:
            open_session = await session(region)
            opened_ok[region] += 1
            worker, i = commands[region], 0
            try:
                while not stop.is_set():
                    key, value = f"k-{region}-{n}", f"v{i}"
                    try:
                        ok = await open_session.call("SET", key, value) == b"+OK"
                        ok = ok and await open_session.call("GET", key) == value.encode()
                    except (OSError, TimeoutError, asyncio.IncompleteReadError):
                        ok = False
                    if ok:
                        worker.succeeded()
                    else:
                        worker.failed += 1
                    i += 1
                    await asyncio.sleep(PAUSE)
            finally:
                open_session.close()

        async def open_sessions(region: str) -> None:
            worker = opens[region]
            while not stop.is_set():
                try:
                    fresh = await session(region)
                    ok = await fresh.call("PING") == b"+PONG"
                    fresh.close()
                except Exception:  # a refusal or a broken connection: counted
                    ok = False
                if ok:
                    opened_ok[region] += 1
                    worker.succeeded()
                else:
                    worker.failed += 1
                await asyncio.sleep(0.1)

        present: Counter[str] = Counter()
        missing: Counter[str] = Counter()
        unanswered = 0

        async def heartbeats() -> None:
            """Each agent's heartbeat, read every 0.2 s from a hub server that lives (a
            direct get: any copy answers, even while the bucket elects a leader)."""
            nonlocal unanswered
            while True:
                for region, key in beat_keys.items():
                    try:
                        beat = await reader.get(subjects.DB_SERVERS_BUCKET, key, DbServerHeartbeat)
                    except FAILURES:
                        unanswered += 1
                        continue
                    (present if beat is not None else missing)[region] += 1
                await asyncio.sleep(0.2)

        tasks = [
            *(asyncio.create_task(run_commands(region, n)) for region in REGIONS for n in (0, 1)),
            *(asyncio.create_task(open_sessions(region)) for region in REGIONS),
        ]
        watching = asyncio.create_task(heartbeats())
        try:
            await asyncio.sleep(1.5)
            roles = hub_roles(topo, victim)
            topo.kill(victim)
            await asyncio.sleep(4.0)
            await asyncio.to_thread(topo.restart, victim)
            await asyncio.sleep(2.0)
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)

        starts: list[str] = []

        async def all_starts_audited() -> bool:
            nonlocal starts
            starts = [
                e.session_id
                async for e in read_events(auditor, subject="fleetgate.audit.db.session.start")
                if e.success and e.user == "alice"
            ]
            return len(starts) >= sum(opened_ok.values())

        with contextlib.suppress(AssertionError):
            await wait_until(all_starts_audited, 20, "every session start audited")

    for bus in (admin, reader, auditor):
        await bus.close()
    with capsys.disabled():
        print(
            "\n".join(
                [
                    "",
                    f"hub server lost, real agents: SIGKILL {victim.name} "
                    f"({', '.join(roles) or 'no leader'}), restarted after 4.0s",
                    *(w.line() for w in commands.values()),
                    *(w.line() for w in opens.values()),
                    "  heartbeats (interval 1s, TTL 15s) read every 0.2s: "
                    + ", ".join(
                        f"{region} present {present[region]}, missing {missing[region]}"
                        for region in REGIONS
                    )
                    + f" ({unanswered} reads unanswered)",
                    f"  sessions opened {sum(opened_ok.values())}, starts audited {len(starts)}, "
                    f"duplicated {len(starts) - len(set(starts))}",
                ]
            )
        )
    assert all(w.failed == 0 for w in commands.values())
    assert all(w.failed == 0 for w in opens.values())
    assert all(w.ok > 20 for w in [*commands.values(), *opens.values()])
    assert not missing and all(present[region] > 10 for region in REGIONS)
    assert len(starts) == len(set(starts)) == sum(opened_ok.values())


async def test_a_watch_whose_consumer_dies_with_its_server_picks_up_again(
    topo: NatsTopology, capsys: pytest.CaptureFixture[str]
) -> None:
    """A watch reads through a consumer that lives on one hub server: killed with it, the
    watch heard nothing more (nats-py only notices a gap when a message arrives, and
    none does) until the server came back, or forever when the consumer could not be
    made again. It must notice, open again and report what it missed, once."""
    assert await provision(topo.hub_urls("admin"), R3, migrate=False) == 0
    discovery = await bus_at(topo.leaf_url("eu-west-1", "discovery"), "discovery")
    agent = await bus_at(topo.leaf_url("us-east-1", "agent"), "agent")
    seen: Counter[tuple[str, int]] = Counter()
    synced = asyncio.Event()

    async def watch() -> None:
        async for event in agent.watch_resources():
            if event.kind == "upsert":
                seen[(event.key, event.revision)] += 1
            elif event.kind == "synced":
                synced.set()

    watching = asyncio.create_task(watch())
    try:
        await asyncio.wait_for(synced.wait(), 10)
        watches = [w for w in agent._watches]
        consumer = await watches[0]._watcher._sub.consumer_info()
        host = consumer.cluster.leader if consumer.cluster is not None else None
        victim = next(hub for hub in topo.hub_nodes if hub.name == host)
        topo.kill(victim)
        writes = Worker("registry writes")
        written: dict[str, int] = {}
        began = time.monotonic()
        for n in range(20):
            key = subjects.database_key(f"db-{n}")
            written[key] = await until_ok(writes, lambda n=n: discovery.put_resource(db(f"db-{n}")))
            await asyncio.sleep(0.1)
        took = await wait_until(
            lambda: all((key, rev) in seen for key, rev in written.items()), 60, "the watch"
        )
        after_kill = time.monotonic() - began
        with capsys.disabled():
            print(
                f"\nwatch consumer's server {victim.name} killed: the watch had every write "
                f"{after_kill:.1f}s after the kill ({took:.1f}s after the last write); "
                f"doubled {sum(1 for c in seen.values() if c > 1)}"
            )
        assert all(count == 1 for count in seen.values())
        # it noticed by itself: seconds (20 s before it checked its consumer)
        assert after_kill < 12.0
        await asyncio.to_thread(topo.restart, victim)
    finally:
        watching.cancel()
        await asyncio.gather(watching, return_exceptions=True)
        for bus in (discovery, agent):
            await bus.close()
