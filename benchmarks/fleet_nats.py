"""The fleet's NATS: registry propagation from the hub to agents behind leaf nodes, and
the audit stream's throughput at R3 against R1.

Runs the hub of deploy/nats/hub.conf (3 servers, TLS, JetStream, every bucket R3) and
one leaf node of deploy/nats/leaf.conf per region (tests/kits/natscluster.py), then:

- writes ``--databases`` databases per region into the registry (discovery's records,
  labelled with their region), compare-and-set as discovery writes;
- starts one watcher process per region, behind that region's leaf, logged in as the
  ``agent`` user, doing what an agent does: the registry watch of
  ``dbservice.agent.served.follow_registry`` with a matcher ``{region: <its region>}``
  and a supervisor whose workers only note when their database changes;
- paced writes: one database at a time (a tag change, compare-and-set, from a
  ``discovery`` client on the hub), each waited for until its region's watcher has it:
  the time from the write to the watcher's worker seeing the change, per region
  (p50, p99, max);
- a burst: a tag changed on every database, written as a discovery poll writes its plan
  (32 in flight): the same figures under load, and the time until the last is seen;
- new watchers behind a leaf syncing the whole registry (connect, snapshot, reconcile);
- the audit stream: ``AuditEmitter`` (64 messages in flight, each acknowledged, as the
  agent publishes) with session starts (one event per message) and batches of 32
  commands, to the stream at R1 on a lone server (the sandbox's), at R1 and at R3 in the
  hub, from an agent connected to the hub and from one behind a leaf; rounds
  interleaved, median and range.

It exits non-zero when a write is not seen, a watcher serves another region's database,
a sync misses databases, or an audit event is not acknowledged.

    python benchmarks/fleet_nats.py              # 3 regions x 1,000 databases
    python benchmarks/fleet_nats.py --quick      # a smoke run (seconds)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))  # benchmarks.sizing, tests.kits
SCRIPT = Path(__file__).resolve()

import nats.errors  # noqa: E402
import nats.js.errors  # noqa: E402

from benchmarks.sizing import resource  # noqa: E402
from bus import Bus, DatabaseResource, subjects  # noqa: E402
from bus import leases as cas  # noqa: E402
from bus.access import Identity  # noqa: E402
from bus.audit import SessionStart, encode_query, ensure_audit_stream, publish_event  # noqa: E402
from bus.errors import RegistryError  # noqa: E402
from bus.server import NatsServer  # noqa: E402
from bus.specs import Replication  # noqa: E402
from dbservice.access.audit import AuditEmitter  # noqa: E402
from dbservice.agent.config import ResourceMatcher  # noqa: E402
from dbservice.agent.served import Selection, follow_registry  # noqa: E402
from dbservice.agent.supervisor import Supervisor  # noqa: E402
from dbservice.agent.worker import PassiveWorker  # noqa: E402
from discovery.poller import WRITE_CONCURRENCY  # noqa: E402

REGIONS = ("us-east-1", "eu-west-1", "ap-southeast-2")
MARK = "deploy-id"
"""The tag (label) the timed writes change; its value names the write."""
URL_VAR = "FLEETGATE_BENCH_NATS_URL"
"""How a watcher process gets its NATS URL (it holds a password: not on a command line)."""
SEEN_TIMEOUT = 30.0
AUDIT_BATCH = 32


# -- the watcher process (an agent's registry watch) ---------------------------------------


class _Noting(PassiveWorker):
    """A supervisor's worker that notes, on stdout, each change of its database."""

    def update(self, resource: DatabaseResource) -> None:
        super().update(resource)
        _say(seen=resource.name, mark=resource.metadata.labels.get(MARK, ""), t=time.monotonic())


def _say(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


async def watcher(region: str) -> None:
    """Follow the registry as an agent of ``region`` does until stdin closes."""
    began = time.monotonic()
    loop = asyncio.get_running_loop()
    closed = asyncio.Event()
    loop.add_reader(sys.stdin.fileno(), lambda: closed.set() if not os.read(0, 4096) else None)
    supervisor = Supervisor(make_worker=_Noting, announcer=None)
    selection = Selection([ResourceMatcher(labels={"region": region})], [])
    async with await Bus.connect(os.environ[URL_VAR], name=f"bench-agent-{region}") as bus:
        connected = time.monotonic()
        first = True

        def on_synced(count: int) -> None:
            nonlocal first
            if first:
                first = False
                served = [r.metadata.labels.get("region") for r in supervisor.served.values()]
                _say(
                    synced=count,
                    others=sum(r != region for r in served),
                    connect=connected - began,
                    sync=time.monotonic() - began,
                )

        task = asyncio.create_task(
            follow_registry(
                bus=bus, selection=selection, supervisor=supervisor, on_synced=on_synced
            )
        )
        stop = asyncio.create_task(closed.wait())
        await asyncio.wait((task, stop), return_when=asyncio.FIRST_COMPLETED)
        for t in (task, stop):
            t.cancel()
        await asyncio.gather(task, stop, return_exceptions=True)
        await supervisor.stop_all()


@dataclass
class Watcher:
    """A watcher process, seen from the benchmark."""

    region: str
    proc: asyncio.subprocess.Process
    synced: asyncio.Future[dict[str, Any]]
    seen: dict[tuple[str, str], float] = field(default_factory=dict)
    waiting: dict[tuple[str, str], asyncio.Event] = field(default_factory=dict)
    reader: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, region: str, url: str) -> Watcher:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(SCRIPT),
            "--watcher",
            region,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, URL_VAR: url},
        )
        w = cls(region, proc, asyncio.get_running_loop().create_future())
        w.reader = asyncio.create_task(w._read())
        return w

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:
            fields = json.loads(line)
            if "synced" in fields:
                self.synced.set_result(fields)
                continue
            key = (fields["seen"], fields["mark"])
            self.seen.setdefault(key, fields["t"])
            event = self.waiting.get(key)
            if event is not None:
                event.set()
        if not self.synced.done():
            self.synced.set_exception(RuntimeError(f"the {self.region} watcher exited"))

    async def wait_seen(self, key: tuple[str, str], within: float) -> float | None:
        if key not in self.seen:
            event = self.waiting.setdefault(key, asyncio.Event())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), within)
            self.waiting.pop(key, None)
        return self.seen.get(key)

    async def stop(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        if self.reader is not None:
            await self.reader


# -- figures ------------------------------------------------------------------------------


def pct(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile by nearest rank (p99 of 100 values: the 99th)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def latency_rows(label: str, delays: dict[str, list[float]]) -> list[str]:
    lines = []
    for region, values in delays.items():
        if values:
            lines.append(
                f"  {label:<7} {region:<15} n={len(values):<5} p50 {ms(pct(values, 0.5)):>7} ms  "
                f"p99 {ms(pct(values, 0.99)):>7} ms  max {ms(max(values)):>7} ms"
            )
    return lines


class Failed(Exception):
    """A check of the benchmark failed: its message says which."""


# -- registry propagation -----------------------------------------------------------------


@dataclass
class Options:
    databases: int
    paced: int
    syncs: int
    audit_messages: int
    rounds: int


def key_of(name: str) -> str:
    return subjects.database_key(name)


def fleet(databases: int) -> dict[str, DatabaseResource]:
    """``databases`` per region, interleaved by region (as a write order)."""
    out = {}
    for i in range(databases):
        for region in REGIONS:
            db = resource(i, region=region, name=f"orders-{region}-{i:05d}")
            out[db.name] = db
    return out


def marked(db: DatabaseResource, mark: str) -> DatabaseResource:
    labels = {**db.metadata.labels, MARK: mark}
    return db.model_copy(update={"metadata": db.metadata.model_copy(update={"labels": labels})})


async def propagation(topo: Any, opts: Options, out: Callable[[str], None]) -> None:
    async with await Bus.connect(topo.hub_urls("admin"), name="bench-admin") as admin:
        admin.replication = Replication(3)
        await admin.provision()
    async with await Bus.connect(topo.hub_urls("discovery"), name="bench-discovery") as writer:
        dbs = fleet(opts.databases)
        revisions: dict[str, int] = {}
        limit = asyncio.Semaphore(WRITE_CONCURRENCY)

        async def create(db: DatabaseResource) -> None:
            async with limit:
                rev = await cas.create(writer, subjects.DATABASES_BUCKET, key_of(db.name), db)
                if rev is None:
                    raise Failed(f"{db.name} exists already")
                revisions[db.name] = rev

        began = time.monotonic()
        await asyncio.gather(*(create(db) for db in dbs.values()))
        took = time.monotonic() - began
        out(
            f"registry     {len(dbs)} databases ({opts.databases} per region x {len(REGIONS)}, "
            f"R3) written from the hub in {took:.1f}s ({len(dbs) / took:.0f}/s, "
            f"{WRITE_CONCURRENCY} in flight, compare-and-set)"
        )

        watchers = {r: await Watcher.start(r, topo.leaf_url(r, "agent")) for r in REGIONS}
        try:
            syncs = []
            for w in watchers.values():
                syncs.append(await check_sync(w, opts.databases))
            out(
                "first sync   3 watchers at once, one behind each leaf: "
                + ", ".join(f"{s['sync']:.2f}s" for s in syncs)
                + " (connect "
                + ", ".join(f"{s['connect']:.2f}s" for s in syncs)
                + f"); each serves its {opts.databases}"
            )

            async def write(name: str, mark: str) -> tuple[float, float]:
                db = marked(dbs[name], mark)
                start = time.monotonic()
                rev = await cas.update(
                    writer, subjects.DATABASES_BUCKET, key_of(name), db, last=revisions[name]
                )
                if rev is None:
                    raise Failed(f"the write of {name} lost its compare-and-set")
                revisions[name] = rev
                dbs[name] = db
                return start, time.monotonic()

            def region_of(name: str) -> str:
                return dbs[name].metadata.labels["region"]

            # paced: one at a time, each waited for
            delays: dict[str, list[float]] = {r: [] for r in REGIONS}
            acks: list[float] = []
            names = list(dbs)
            rng = random.Random(19)
            for n in range(opts.paced):
                name = rng.choice([m for m in names if region_of(m) == REGIONS[n % len(REGIONS)]])
                mark = f"p{n}"
                start, acked = await write(name, mark)
                acks.append(acked - start)
                seen = await watchers[region_of(name)].wait_seen((name, mark), SEEN_TIMEOUT)
                if seen is None:
                    raise Failed(f"paced write {n} ({name}) not seen in {SEEN_TIMEOUT:.0f}s")
                delays[region_of(name)].append(seen - start)
            out(
                f"paced        {opts.paced} tag changes, one at a time from the hub, to a watcher "
                f"behind its region's leaf (write acknowledged: p50 {ms(pct(acks, 0.5))} ms, "
                f"p99 {ms(pct(acks, 0.99))} ms)"
            )
            for line in latency_rows("paced", delays):
                out(line)

            # a burst: every database's tag changed as a discovery poll writes its plan
            started: dict[str, float] = {}

            async def burst_one(name: str) -> None:
                async with limit:
                    started[name], _ = await write(name, "burst")

            began = time.monotonic()
            await asyncio.gather(*(burst_one(name) for name in names))
            written = time.monotonic() - began
            delays = {r: [] for r in REGIONS}
            last = 0.0
            for name in names:
                seen = await watchers[region_of(name)].wait_seen((name, "burst"), SEEN_TIMEOUT)
                if seen is None:
                    raise Failed(f"burst write of {name} not seen in {SEEN_TIMEOUT:.0f}s")
                delays[region_of(name)].append(seen - started[name])
                last = max(last, seen)
            out(
                f"burst        {len(names)} tag changes ({WRITE_CONCURRENCY} in flight) written in "
                f"{written:.2f}s ({len(names) / written:.0f}/s); the last seen "
                f"{last - began:.2f}s after the first write"
            )
            for line in latency_rows("burst", delays):
                out(line)
        finally:
            for w in watchers.values():
                await w.stop()
        strays = {
            w.region: sorted({n for n, _ in w.seen if region_of(n) != w.region})
            for w in watchers.values()
        }
        if any(strays.values()):
            raise Failed(f"watchers saw other regions' databases: {strays}")

    # a new watcher behind a leaf, alone: the whole registry
    times = []
    for n in range(opts.syncs):
        region = REGIONS[n % len(REGIONS)]
        w = await Watcher.start(region, topo.leaf_url(region, "agent"))
        try:
            times.append(await check_sync(w, opts.databases))
        finally:
            await w.stop()
    out(
        f"new watcher  alone behind a leaf, the whole registry ({len(dbs)} entries, serving "
        f"{opts.databases}): "
        + ", ".join(f"{s['sync']:.2f}s (connect {s['connect']:.2f}s)" for s in times)
    )


async def check_sync(w: Watcher, databases: int) -> dict[str, Any]:
    synced = await asyncio.wait_for(w.synced, 60)
    if synced["synced"] != databases or synced["others"]:
        raise Failed(
            f"the {w.region} watcher serves {synced['synced']} databases "
            f"({synced['others']} of other regions), not its {databases}"
        )
    return synced


# -- audit throughput ---------------------------------------------------------------------


WORKLOADS = ("starts", "batches")


@dataclass(frozen=True)
class Rate:
    """One cell of one round."""

    events_per_s: float
    server_us: float
    """CPU of every nats-server process of the run, per message, in microseconds."""
    client_us: float
    """CPU of the publishing process (this one), per message, in microseconds."""


def cpu_of(pids: Sequence[int]) -> float:
    """User and system CPU seconds the processes ``pids`` have used (from /proc)."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / os.sysconf("SC_CLK_TCK")


async def audit_rate(url: str, workload: str, messages: int, servers: Sequence[int]) -> Rate:
    """How fast the agent's emitter gets events acknowledged by the audit stream
    (``starts``: one session start per message; ``batches``: 32 commands per message),
    and what it costs the servers (``servers``: their process ids) and the client."""
    async with await Bus.connect(url, name="bench-audit") as bus:
        emitter = AuditEmitter.for_bus(bus, host_id="bench", maxsize=messages * AUDIT_BATCH + 1)
        expected = 0
        if workload == "starts":
            for n in range(messages):
                emitter.emit(SessionStart(user="alice@example.com", database=f"orders-{n:05d}"))
            expected = messages
        else:
            identity = Identity(user="alice@example.com", roles=("dev",))
            session = emitter.session(
                identity, database="orders-00001", db_user="app-user", client_addr="10.1.2.3:5234"
            )
            for n in range(messages):
                now = time.time()
                queries = [
                    encode_query(now, "GET", [f"order:{n * AUDIT_BATCH + q:08d}"])
                    for q in range(AUDIT_BATCH)
                ]
                emitter.emit_queries(session, n * AUDIT_BATCH + 1, queries)
            expected = messages * AUDIT_BATCH
        # one event first, untimed: the connection's way to the stream is set up
        await publish_event(bus, SessionStart(user="warm-up"))
        server_cpu, client_cpu = cpu_of(servers), time.process_time()
        began = time.monotonic()
        emitter.start()
        done = await emitter.flush(120)
        took = time.monotonic() - began
        server_cpu, client_cpu = cpu_of(servers) - server_cpu, time.process_time() - client_cpu
        published = emitter.published_total
        await emitter.aclose()
        if not done or published != expected or emitter.dropped_total:
            raise Failed(
                f"audit at {bus.url}: {published} of {expected} events acknowledged, "
                f"{emitter.dropped_total} dropped"
            )
        return Rate(expected / took, server_cpu / messages * 1e6, client_cpu / messages * 1e6)


async def fresh_audit_stream(url: str, replicas: int) -> None:
    """The audit stream made anew. A hub on a busy machine may leave a JetStream request
    unanswered for a while (its meta leader is elected again when a server misses its
    heartbeats): tried again for up to a minute, as an operator would."""
    deadline = time.monotonic() + 60
    async with await Bus.connect(url, name="bench-admin") as admin:
        admin.replication = Replication(replicas)
        while True:
            try:
                with contextlib.suppress(nats.js.errors.NotFoundError):
                    await admin.js.delete_stream(subjects.AUDIT_STREAM)
                await ensure_audit_stream(admin)
                return
            except (RegistryError, nats.errors.TimeoutError) as exc:
                if time.monotonic() > deadline:
                    raise
                print(f"  (audit stream at {replicas} replicas: {exc}; trying again)")
                await asyncio.sleep(1)


COLUMNS = ("R1 lone server", "R1 in the hub", "R3 in the hub")
CLIENTS = ("hub", "leaf")


def audit(topo: Any, lone: NatsServer, opts: Options, out: Callable[[str], None]) -> None:
    rates: dict[tuple[str, str, str], list[Rate]] = {}
    hub, leaf = topo.hub_urls("agent"), topo.leaf_url(REGIONS[0], "agent")
    servers = [node.server.proc.pid for node in topo.nodes]
    assert lone.proc is not None
    lone_pid = lone.proc.pid

    async def rounds() -> None:
        for _ in range(opts.rounds):
            for workload in WORKLOADS:
                admin = topo.hub_urls("admin")
                runs: list[tuple[str, str, str, tuple[str, int] | None]] = [
                    ("hub", COLUMNS[0], lone.url, (lone.url, 1)),
                    ("hub", COLUMNS[1], hub, (admin, 1)),  # a new stream, R1
                    ("leaf", COLUMNS[1], leaf, None),
                    ("hub", COLUMNS[2], hub, (admin, 3)),  # a new stream, R3
                    ("leaf", COLUMNS[2], leaf, None),
                ]
                for client, column, url, stream in runs:
                    if stream is not None:
                        await fresh_audit_stream(*stream)
                    pids = [lone_pid] if column == COLUMNS[0] else servers
                    rate = await audit_rate(url, workload, opts.audit_messages, pids)
                    rates.setdefault((workload, client, column), []).append(rate)

    asyncio.run(rounds())

    def spread(values: Sequence[float], digits: int = 0) -> str:
        mid = statistics.median(values)
        if len(values) == 1:
            return f"{mid:,.{digits}f}"
        return f"{mid:,.{digits}f} ({min(values):,.{digits}f}-{max(values):,.{digits}f})"

    def ratios(over: list[Rate] | None, under: list[Rate] | None) -> str:
        """The median (range) of one round's ``over / under``: both measured back to back,
        so a change of the machine's load between rounds cancels out."""
        if not over or not under:
            return "-"
        each = [o.events_per_s / u.events_per_s for o, u in zip(over, under, strict=True)]
        return spread(each, 2)

    def label(workload: str) -> str:
        return "session starts" if workload == "starts" else f"commands in {AUDIT_BATCH}s"

    out(
        f"audit        AuditEmitter, 64 messages in flight, each acknowledged; "
        f"{opts.audit_messages} messages per cell (session starts, or batches of "
        f"{AUDIT_BATCH} commands); median (range) of {opts.rounds} round(s)"
    )
    out(
        f"  {'events/s':<16} {'client':<6}"
        + "".join(f"{c:>26}" for c in COLUMNS)
        + f"{'R3/R1 hub':>19}{'R3/lone':>19}"
    )
    for workload in WORKLOADS:
        for client in CLIENTS:
            cells = [rates.get((workload, client, c)) for c in COLUMNS]
            alone, r1, r3 = cells
            out(
                f"  {label(workload):<16} {client:<6}"
                + "".join(f"{spread([r.events_per_s for r in c]) if c else '-':>26}" for c in cells)
                + f"{ratios(r3, r1):>19}{ratios(r3, alone):>19}"
            )
    out(
        f"  {'CPU us/message':<16} {'client':<6}"
        + "".join(f"{c:>26}" for c in COLUMNS)
        + "   (servers: every nats-server of the run; client: this process)"
    )
    for workload in WORKLOADS:
        for client in CLIENTS:
            cells = [rates.get((workload, client, c)) for c in COLUMNS]
            out(
                f"  {label(workload):<16} {client:<6}"
                + "".join(f"{cpu(c):>26}" if c else f"{'-':>26}" for c in cells)
            )


def cpu(rates: Sequence[Rate]) -> str:
    server = statistics.median(r.server_us for r in rates)
    client = statistics.median(r.client_us for r in rates)
    return f"servers {server:.0f}, client {client:.0f}"


# -- main ---------------------------------------------------------------------------------


@contextlib.contextmanager
def fleet_topology(directory: Path) -> Iterator[Any]:
    from tests.kits.natscluster import NatsTopology

    topo = NatsTopology(directory, regions=REGIONS)
    os.environ["SSL_CERT_FILE"] = str(topo.ca_file)  # the kit's CA, for every client
    with topo:
        yield topo


def run(opts: Options, out: Callable[[str], None] = print) -> None:
    out(
        f"machine      {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, {platform.system()}; load average "
        + " ".join(f"{x:.1f}" for x in os.getloadavg())
    )
    with tempfile.TemporaryDirectory() as tmp:
        began = time.monotonic()
        with fleet_topology(Path(tmp) / "fleet") as topo:
            out(
                f"topology     hub of 3 (hub.conf: routes, TLS, JetStream) and "
                f"{len(REGIONS)} leaves (leaf.conf), ready in {time.monotonic() - began:.1f}s"
            )
            asyncio.run(propagation(topo, opts, out))
            with NatsServer(Path(tmp) / "lone") as lone:
                audit(topo, lone, opts, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--databases", type=int, default=1000, help="per region (3 regions)")
    parser.add_argument("--paced", type=int, default=300, help="paced writes, in all")
    parser.add_argument("--syncs", type=int, default=3, help="new watchers, one at a time")
    parser.add_argument(
        "--audit-messages",
        type=int,
        default=10_000,
        help="messages per cell: session starts, or batches of 32 commands",
    )
    parser.add_argument("--rounds", type=int, default=3, help="audit rounds, interleaved")
    parser.add_argument("--quick", action="store_true", help="a smoke run: small everything")
    parser.add_argument("--watcher", metavar="REGION", help=argparse.SUPPRESS)
    args = parser.parse_args()
    # nats-py's TLS connections make asyncio warn at each close that returning True from
    # eof_received() has no effect with TLS: noise here
    logging.getLogger("asyncio").setLevel(logging.ERROR)
    if args.watcher:
        asyncio.run(watcher(args.watcher))
        return
    if args.quick:
        opts = Options(databases=40, paced=15, syncs=1, audit_messages=250, rounds=1)
    else:
        opts = Options(args.databases, args.paced, args.syncs, args.audit_messages, args.rounds)
    try:
        run(opts)
    except Failed as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
