"""The sandbox supervisor: the whole fleet on one machine, on loopback.

It hosts moto (AWS) and one MemoryDB stand-in per cluster itself, and runs as child
processes ``nats-server -js`` and the very commands an operator runs: ``fleetgate
discovery run``, ``fleetgate auth run`` and one ``fleetgate agent run`` per region, each
agent selecting its region's VPC. With ``--regions N`` NATS is the topology of
deploy/nats instead (:mod:`sandbox.natsfleet`): a hub of 3 servers (JetStream R3) where
discovery and the auth service connect, and a leaf node per region for its agent; a hub
server or leaf that dies is started again, as systemd would. Parts start in parallel
as soon as what they need is there; one line is printed as each becomes ready.
:meth:`Sandbox.stop` stops everything it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

from bus import Bus, joins
from bus.access import put_role
from bus.audit import ensure_audit_stream
from bus.server import NatsServer, config_string
from bus.settings import NatsConnection, NatsSettings, NatsTLS, resolve_nats
from bus.specs import Replication
from dbservice.access.ca import write_private
from dbservice.auth.admin import add_user, init_ca, parse_role
from dbservice.auth.natsrights import issuer_public_key, new_issuer_seed
from dbservice.auth.passwords import hash_password
from sandbox import children, seeding
from sandbox.aws import MotoServer
from sandbox.iamfront import IamFront, MemoryDBLogin
from sandbox.memorydb import MemoryDBStandin, StandinConfig
from sandbox.natsfleet import REGION_NAMES, NatsFleet, Node, write_tls
from sandbox.ports import free_port, reached_itself
from sandbox.state import (
    Database,
    NatsNode,
    Part,
    SandboxError,
    SandboxState,
    make_private,
    nats_password_file,
    nats_passwords,
    nats_url_as,
    secret_file,
)
from sandbox.tlsca import TestCA

T = TypeVar("T")

ROLES: dict[str, dict[str, Any]] = {
    "dev-access": {
        "kind": "role",
        "name": "dev-access",
        "description": "developers: dev and staging databases, as db user app",
        "allow": {"db_labels": {"env": ["dev", "staging"]}, "db_users": ["app"]},
        "options": {"max_session_ttl": "8h"},
    },
    "admin": {
        "kind": "role",
        "name": "admin",
        "description": "everything, as any db user",
        "allow": {"db_labels": {"*": "*"}, "db_users": ["*"]},
    },
}
NATS_CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "nats" / "nats-server.conf"
"""The production NATS config: the sandbox runs with its users and permissions."""
USER = "alice"
USER_ROLES = ["dev-access"]
JOIN_TOKEN_TTL = 3600.0
FRESH = ("nats", "memorydb", "agents", "config", "tls")
"""Directories rebuilt on every ``up`` (the fleet CA and alice's password are kept, so a
login made against an earlier run keeps trusting the auth service)."""


@dataclass(kw_only=True)
class Options:
    dir: Path
    clusters: int = 4
    shards: int = 1
    """Shards per stand-in cluster (cluster mode either way)."""
    nats_port: int | None = None
    auth_port: int | None = None
    regions: int = 0
    """0: one NATS server, agents in us-east-1 and eu-west-1. N: the hub cluster and a
    leaf node per region, N regions with an agent each."""
    ready_timeout: float = 60.0


STARTED_ENV = "FLEETGATE_SANDBOX_STARTED"
"""Set by ``up --detach`` for the supervisor it starts: when the person's command began
(epoch seconds), so the times shown count from there."""


def command_age() -> float:
    """Seconds since the command began: since ``up --detach`` when it started us, else
    since this process started (its imports count: the person waited for them too)."""
    with contextlib.suppress(KeyError, ValueError):
        return max(0.0, time.time() - float(os.environ[STARTED_ENV]))
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


class Progress:
    """One line per event, with the seconds since the command began; fine on a pipe."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self.began = time.monotonic() - command_age()

    def elapsed(self) -> float:
        return time.monotonic() - self.began

    def line(self, part: str, text: str) -> None:
        print(f"{self.elapsed():5.1f}s  {part:<12} {text}", file=self.out, flush=True)


class Sandbox:
    def __init__(self, options: Options, progress: Progress) -> None:
        self.o = options
        self.dir = options.dir
        self.progress = progress
        self.state = SandboxState(dir=str(self.dir), pid=os.getpid(), started_at=time.time())
        self.nats: NatsServer | None = None
        self.fleet: NatsFleet | None = None
        self.regions: tuple[str, ...] = (
            REGION_NAMES[: options.regions] if options.regions else seeding.REGIONS
        )
        self.agents = {f"agent-{n}": region for n, region in enumerate(self.regions, start=1)}
        """agent name -> its region"""
        self._keeper: asyncio.Task[None] | None = None
        self.moto: MotoServer | None = None
        self.standins: dict[str, MemoryDBStandin] = {}
        self.children: dict[str, children.Child] = {}
        self.clusters: list[seeding.SeededCluster] = []
        self.vpcs: dict[str, str] = {}
        self.bus: Bus | None = None
        self.db_ca = TestCA.create("fleetgate sandbox MemoryDB CA")
        self.ca_fingerprint = ""
        self.password = ""
        self.nats_passwords: dict[str, str] = {}
        self.agent_ports: dict[str, int] = {}
        self.diag_ports: dict[str, int] = {}
        """Each process's diagnostics listener (/metrics, /healthz, /readyz)."""
        self.auth_port = 0
        self.stopping = False
        self._threads: list[asyncio.Future[Any]] = []
        self._unfollow: list[Callable[[], None]] = []

    @property
    def nats_url(self) -> str:
        """Where clients of the hub connect: the server, or every hub server."""
        if self.fleet is not None:
            return ",".join(hub.address for hub in self.fleet.hub_nodes)
        assert self.nats is not None
        return self.nats.url

    @property
    def nats_ca_file(self) -> Path | None:
        """With ``--regions``, the CA of the servers' certificates (TLS everywhere)."""
        return self.path("tls", "nats", "ca.pem") if self.fleet is not None else None

    def nats_url_as(self, user: str | None, region: str | None = None) -> str:
        """The NATS URL logged in as ``user`` of deploy/nats/nats-server.conf (None: no
        login in it, for an agent that logs in as itself); with ``--regions`` and a
        ``region``, that region's leaf node, else the hub."""
        if self.fleet is not None and region is not None:
            urls = [self.fleet.leaf_nodes[region].address]
        else:
            urls = self.nats_url.split(",")
        if user is None:
            return ",".join(urls)
        password = self.nats_passwords[user]
        return ",".join(nats_url_as(url, user, password) for url in urls)

    def nats_connection(self, user: str) -> NatsConnection:
        """How the supervisor connects to the hub as ``user`` (TLS with ``--regions``)."""
        ca = self.nats_ca_file
        settings = NatsSettings(tls=NatsTLS(ca_file=ca)) if ca is not None else NatsSettings()
        return resolve_nats(self.nats_url_as(user), settings, env={})

    def jetstream(self, config: dict[str, Any]) -> dict[str, Any]:
        """A process config with the hub's replication (R3) when it runs a cluster."""
        return {**config, "jetstream": {"replicas": 3}} if self.fleet is not None else config

    @property
    def aws_env(self) -> dict[str, str]:
        assert self.moto is not None
        return self.moto.environ()

    def path(self, *parts: str) -> Path:
        return self.dir.joinpath(*parts)

    # -- start ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Start every part; return once the fleet is ready (databases enrolled, served
        by healthy agents, the auth service answering). SandboxError says what failed."""
        self._prepare()
        self.progress.line("sandbox", f"starting in {self.dir}")
        nats = asyncio.ensure_future(self._step("nats", self._start_nats()))
        aws = asyncio.ensure_future(self._step("aws", self._start_aws()))
        steps = [nats, aws]
        standins = asyncio.ensure_future(self._step("memorydb", self._start_standins(aws)))
        access = asyncio.ensure_future(self._step("auth", self._start_access(nats)))
        discovery = asyncio.ensure_future(self._step("discovery", self._start_discovery(nats, aws)))
        agents = asyncio.ensure_future(self._step("agents", self._start_agents(access, standins)))
        steps += [standins, access, discovery, agents]
        try:
            await _all_or_nothing(steps)
            await self._step("ready", self._wait_ready())
        except BaseException:
            for step in steps:
                step.cancel()
            await asyncio.gather(*steps, return_exceptions=True)
            raise
        self.state.state = "ready"
        self.state.ready_seconds = round(self.progress.elapsed(), 1)
        self._record()
        if self.fleet is not None:
            self._keeper = asyncio.create_task(self._keep_nats_up(self.fleet))

    async def _keep_nats_up(self, fleet: NatsFleet) -> None:
        """A hub server or leaf node that exits is started again on its ports and store
        (as systemd's ``Restart=always`` would); sandbox.json follows its new pid."""
        while not self.stopping:
            await asyncio.sleep(0.5)
            for node in fleet.nodes:
                if node.running or self.stopping:
                    continue
                code = node.server.proc.poll() if node.server.proc is not None else None
                self.progress.line("nats", f"{node.name} exited (code {code}); starting it again")
                old = node.pid

                def again(node: Node = node) -> None:
                    node.server.kill()  # reaps it, closes its log pipe
                    fleet.restart(node, 30.0, wait=False)

                try:  # a thread stop() waits for: no server started behind its back
                    await self._in_thread(again)
                except Exception as exc:
                    self.progress.line("nats", f"{node.name} did not start: {exc}; trying again")
                    continue
                self._new_pid(node, old)
                self.progress.line("nats", f"{node.name} started again (pid {node.pid})")

    def _new_pid(self, node: Node, old: int) -> None:
        st = self.state
        st.pids = [node.pid if pid == old else pid for pid in st.pids]
        for part in st.parts:
            if part.name == f"nats {node.name}":
                part.pid = node.pid
        for server in st.nats_servers:
            if server.name == node.name:
                server.pid = node.pid
        st.save()

    async def _step(self, part: str, work: Coroutine[Any, Any, T]) -> T:
        try:
            return await work
        except (SandboxError, asyncio.CancelledError):
            raise
        except Exception as exc:  # a part failing to start: say which and why
            raise SandboxError(f"{part} did not start: {exc}") from exc

    def _prepare(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for name in FRESH:
            shutil.rmtree(self.path(name), ignore_errors=True)
        for name in ("logs", "config", "tls"):
            self.path(name).mkdir(parents=True, exist_ok=True)
        for log in self.path("logs").glob("*.log"):
            if log.name != "sandbox.log":
                log.unlink()
        self.state.save()

    def _callout_issuer(self) -> str:
        """The public key of the auth callout's issuer (its seed made on first use, kept
        for the auth service's ``nats_callout``)."""
        issuer = self.path("nats-callout.seed")
        if not issuer.exists():
            write_private(issuer, new_issuer_seed())
        return issuer_public_key(issuer.read_bytes().strip())

    async def _start_nats(self) -> None:
        if self.o.regions:
            await self._start_nats_fleet()
            return
        if not NATS_CONFIG.is_file():
            raise SandboxError(f"{NATS_CONFIG} is missing: run the sandbox from a checkout")
        self.nats_passwords = nats_passwords(self.dir)
        env = {
            f"FLEETGATE_NATS_{user.upper()}_PASSWORD": config_string(password)
            for user, password in self.nats_passwords.items()
        }
        # agents' own NATS users are admitted by the auth service (auth_callout)
        env["FLEETGATE_NATS_CALLOUT_ISSUER"] = self._callout_issuer()
        self.nats = NatsServer(
            self.path("nats"), port=self.o.nats_port or -1, config_file=NATS_CONFIG, env=env
        )
        await self._in_thread(self.nats.start)
        # The supervisor provisions (CA, roles, alice, the audit stream): an operator's admin.
        self.bus = await Bus.connect(self.nats_url_as("admin"), name="fleetgate-sandbox")
        self.progress.line("nats", f"ready  {self.nats_url} (JetStream, store {self.path('nats')})")

    async def _start_nats_fleet(self) -> None:
        """The hub cluster (3 servers, JetStream domain hub) and a leaf node per region,
        from deploy/nats/hub.conf and leaf.conf, TLS from the sandbox CA, passwords in
        ``nats-users/`` (each leaf link's as ``leaf-REGION``)."""
        self.nats_passwords = nats_passwords(self.dir)

        def password(user: str) -> str:
            if user not in self.nats_passwords:
                self.nats_passwords[user] = secret_file(nats_password_file(self.dir, user))
            return self.nats_passwords[user]

        tls = self.path("tls", "nats")
        write_tls(tls, self.db_ca)
        self.fleet = NatsFleet(
            self.path("nats"), password, tls, regions=self.regions,
            callout_issuer=self._callout_issuer(),
        )  # fmt: skip
        await self._in_thread(self.fleet.start, self.o.ready_timeout)
        self.bus = await Bus.connect(self.nats_connection("admin"), name="fleetgate-sandbox")
        self.bus.replication = Replication(3)
        hubs = ", ".join(hub.address for hub in self.fleet.hub_nodes)
        self.progress.line("nats", f"ready  hub {hubs} (JetStream R3, domain hub)")
        for leaf in self.fleet.leaf_nodes.values():
            self.progress.line("nats", f"ready  {leaf.name} {leaf.address} (linked to the hub)")

    async def _start_aws(self) -> None:
        def start() -> None:  # importing moto takes a while: not on the loop
            self.moto = MotoServer()
            self.moto.start()

        await self._in_thread(start)
        assert self.moto is not None
        os.environ.pop("AWS_PROFILE", None)
        os.environ.update(self.aws_env)
        os.environ["AWS_CONFIG_FILE"] = str(self.path("config", "no-aws-config"))
        os.environ["AWS_SHARED_CREDENTIALS_FILE"] = str(self.path("config", "no-aws-credentials"))
        ops = self._secret_file("ops.password")
        self.vpcs, self.clusters = await self._in_thread(
            seeding.seed, self.o.clusters, ops, self.regions
        )
        made = count_of(len(self.clusters), "MemoryDB cluster")
        regions = ", ".join(self.regions)
        self.progress.line("aws", f"ready  {self.moto.url} (moto: {made}, {regions})")

    async def _start_standins(self, aws: Awaitable[None]) -> None:
        await aws
        self.db_ca.write(self.path("tls"), "memorydb-ca")
        users = {r: await self._in_thread(seeding.describe_users, r) for r in self.regions}
        await asyncio.gather(*(self._start_standin(c, users[c.region]) for c in self.clusters))
        made = count_of(len(self.standins), "stand-in")
        shards = count_of(self.o.shards, "shard")
        self.progress.line("memorydb", f"ready  {made} ({shards} each, TLS, IAM tokens checked)")

    async def _start_standin(
        self, cluster: seeding.SeededCluster, users: list[dict[str, Any]]
    ) -> None:
        login = MemoryDBLogin(cluster=cluster.name, region=cluster.region)
        login.set_password(seeding.PASSWORD_USER, self._secret_file("ops.password"))
        config = StandinConfig(
            dir=self.path("memorydb", cluster.name),
            name=cluster.name,
            shards=self.o.shards,
            extra_dns_names=[cluster.endpoint],
            ca=self.db_ca,
            front_factory=IamFront.factory(login),
        )
        standin = MemoryDBStandin(config)
        self.standins[cluster.name] = standin
        await standin.start()
        await login.sync(users, standin.nodes)
        self._unfollow.append(login.follow_aws(standin.nodes))  # UpdateUser reaches valkey

    async def _start_access(self, nats: Awaitable[None]) -> None:
        await nats
        assert self.bus is not None
        result = await init_ca(self.bus, self.path("ca"))
        make_private(self.path("ca"))  # its certificate too (0644): the sandbox is private
        self.ca_fingerprint = result.ca.fingerprint
        await ensure_audit_stream(self.bus)
        for name, doc in ROLES.items():
            role_file = children.write_config(
                self.path("config", "roles", f"{name}.yaml"), doc, "# fleetgate sandbox up\n"
            )
            await put_role(self.bus, parse_role(doc, str(role_file)))
        self.password = self._secret_file("alice.password")
        hashed = await asyncio.to_thread(hash_password, self.password)
        await add_user(self.bus, USER, USER_ROLES, [], password_hash=hashed, replace=True)
        await self.bus.provision(joins.TOKENS, joins.AGENTS)
        for name in self.agents:  # each agent joins with its own token
            token, record = joins.new_token(ttl=JOIN_TOKEN_TTL, labels={}, creator="sandbox")
            await joins.add_token(self.bus, record)
            self.path("tls", name).mkdir(parents=True, exist_ok=True, mode=0o700)
            write_private(self.path("tls", name, "join-token"), token.encode())
        self.auth_port = self.o.auth_port or free_port()
        body = children.auth_config(self.auth_port, self.path("ca"))
        # answers NATS's auth callout: agents that log in as themselves (agent-<host_id>)
        body["nats_callout"] = {"issuer_seed_file": str(self.path("nats-callout.seed"))}
        body = self._with_diag("auth", body, body)
        config = children.write_config(self.path("config", "auth.yaml"), self.jetstream(body))
        self._spawn("auth", ["auth", "run", "-c", str(config)], {}, nats_user="auth")
        self.progress.line("auth", f"CA {self.ca_fingerprint}; roles dev-access, admin; user alice")

    async def _start_discovery(self, nats: Awaitable[None], aws: Awaitable[None]) -> None:
        await nats
        await aws
        config = children.write_config(
            self.path("config", "discovery.yaml"),
            self.jetstream(self._with_diag("discovery", children.discovery_config(self.regions))),
        )
        self._spawn(
            "discovery",
            ["discovery", "run", "-c", str(config)],
            self.aws_env,
            nats_user="discovery",
        )

    async def _start_agents(self, access: Awaitable[None], standins: Awaitable[None]) -> None:
        await access
        await standins
        aliases: dict[str, str] = {}
        for cluster in self.clusters:
            host, port = self.standins[cluster.name].endpoint
            aliases[f"{cluster.endpoint}:{cluster.port}"] = f"{host}:{port}"
        for name, region in self.agents.items():
            vpc = self.vpcs[region]
            self.agent_ports[name] = port = free_port()
            config = children.write_config(
                self.path("config", f"{name}.yaml"),
                self.jetstream(self._with_diag(name, children.agent_config(
                    name=name,
                    port=port,
                    data_dir=self.path("agents", name),
                    join={
                        "auth": f"127.0.0.1:{self.auth_port}",
                        "token_file": str(self.path("tls", name, "join-token")),
                        "ca_file": str(self.path("ca", "ca.crt")),
                    },
                    vpc_id=vpc,
                    host_aliases=aliases,
                    upstream_ca=self.path("tls", "memorydb-ca.crt"),
                ))),
            )  # fmt: skip
            self._spawn(
                name,
                ["agent", "run", "-c", str(config)],
                self.aws_env,
                nats_user=None,  # it logs in as itself (agent-<host_id>), given at join
                region=region,
            )

    def _with_diag(
        self, name: str, body: dict[str, Any], section: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """``body`` with a diagnostics listener on a free port (in ``section``, else in
        its one service section)."""
        self.diag_ports[name] = port = free_port()
        if section is None:
            (section,) = body.values()
        section["diag_addr"] = f"127.0.0.1:{port}"
        return body

    def _diag(self, name: str) -> str:
        """Where a part's /metrics, /healthz and /readyz answer."""
        return f"http://127.0.0.1:{self.diag_ports[name]}/"

    async def _in_thread(self, func: Callable[..., T], *args: Any) -> T:
        """``func`` in a thread; a cancelled start leaves the thread running, so
        :meth:`stop` waits for it before stopping what it started."""
        future = asyncio.ensure_future(asyncio.to_thread(func, *args))
        self._threads.append(future)
        return await asyncio.shield(future)

    def _spawn(
        self,
        name: str,
        args: list[str],
        aws: dict[str, str],
        *,
        nats_user: str | None,
        region: str | None = None,
    ) -> None:
        """Start ``fleetgate ARGS``, logged in to NATS as ``nats_user`` through its
        environment (the password in no config file and no command line; None: none,
        an agent's own login comes from its join); with ``--regions``, an agent
        (``region``) connects to its region's leaf node."""
        url = self.nats_url_as(nats_user, region)
        env = children.child_env(aws, url, self.dir, nats_ca_file=self.nats_ca_file)
        log = self.path("logs", f"{name}.log")
        self.children[name] = children.Child(name, args, log, env).start()

    def _secret_file(self, name: str) -> str:
        """A generated password kept in ``name`` (0600) across runs."""
        return secret_file(self.path(name))

    # -- readiness -----------------------------------------------------------------------
    async def _wait_ready(self) -> None:
        assert self.bus is not None
        expected = {c.database for c in self.clusters}
        agent_in = {region: agent for agent, region in self.agents.items()}
        agent_of = {c.database: agent_in[c.region] for c in self.clusters}
        waiting = {"discovery", "auth", *self.agents}
        shown: set[str] = set()
        deadline = time.monotonic() + self.o.ready_timeout
        while True:
            self._check_children()
            names = {r.name for r in await self.bus.list_resources()}
            if "discovery" not in shown and expected <= names:
                shown.add("discovery")
                enrolled = count_of(len(expected), "database")
                self.progress.line("discovery", f"ready  {enrolled} enrolled")
            healthy: dict[str, set[str]] = {}
            for hb in await self.bus.list_db_servers():
                if hb.target_health.status == "healthy":
                    healthy.setdefault(hb.hostname, set()).add(hb.name)
            for agent in self.agents:
                mine = {db for db, a in agent_of.items() if a == agent}
                listening = await _answers(self.agent_ports[agent])
                if agent not in shown and mine <= healthy.get(agent, set()) and listening:
                    shown.add(agent)
                    port = self.agent_ports[agent]
                    self.progress.line(
                        agent, f"ready  127.0.0.1:{port}, {count_of(len(mine), 'database')} healthy"
                    )
            if "auth" not in shown and await _answers(self.auth_port):
                shown.add("auth")
                self.progress.line("auth", f"ready  https://127.0.0.1:{self.auth_port}")
            if waiting <= shown:
                return
            if time.monotonic() > deadline:
                missing = sorted(waiting - shown)
                raise SandboxError(
                    f"not ready after {self.o.ready_timeout:.0f}s: waiting for "
                    f"{', '.join(missing)} (logs in {self.path('logs')})"
                )
            await asyncio.sleep(0.1)

    def _check_children(self) -> None:
        for child in self.children.values():
            code = child.exited()
            if code is not None:
                raise SandboxError(
                    f"{child.name} exited with code {code}; the end of {child.log}:\n"
                    f"{child.log_tail()}"
                )

    def _record(self) -> None:
        """Fill sandbox.json and env with what runs where."""
        assert self.moto is not None
        st = self.state
        me = os.getpid()
        logs = self.path("logs")
        agent_in = {region: agent for agent, region in self.agents.items()}
        nats_ports: list[int] = []
        if self.fleet is None:
            assert self.nats is not None and self.nats.proc is not None
            st.parts = [
                Part("nats", "process", self.nats.proc.pid, self.nats_url, str(self.path("nats")))
            ]
            nats_ports.append(_port(self.nats_url))
        else:
            st.parts = [
                Part(f"nats {n.name}", "process", n.pid, n.address,
                     str(self.path("nats", n.name)), f"monitor 127.0.0.1:{n.monitor_port}")
                for n in self.fleet.nodes
            ]  # fmt: skip
            st.nats_servers = [
                NatsNode(n.name, "hub" if n.role == "hub" else "leaf", n.pid, n.address,
                         n.monitor_port, n.region,
                         [a for a, r in self.agents.items() if n.region and r == n.region])
                for n in self.fleet.nodes
            ]  # fmt: skip
            st.nats_ca_file = str(self.nats_ca_file)
            nats_ports += [port for n in self.fleet.nodes for port in n.ports]
        st.parts += [
            Part("aws", "in-process", me, self.moto.url, str(logs / "sandbox.log"), "moto"),
            Part("auth", "process", self.children["auth"].pid, f"https://127.0.0.1:{self.auth_port}",
                 str(logs / "auth.log"), self.ca_fingerprint, self._diag("auth")),
            Part("discovery", "process", self.children["discovery"].pid, "",
                 str(logs / "discovery.log"), diag=self._diag("discovery")),
        ]  # fmt: skip
        for agent, region in self.agents.items():
            vpc = self.vpcs[region]
            st.parts.append(
                Part(agent, "process", self.children[agent].pid,
                     f"127.0.0.1:{self.agent_ports[agent]}", str(logs / f"{agent}.log"),
                     f"vpc-id {vpc} ({region})", self._diag(agent))
            )  # fmt: skip
        st.databases = []
        for c in self.clusters:
            standin = self.standins[c.name]
            host, port = standin.endpoint
            nodes = [n.proc.pid for n in standin.nodes if n.proc is not None]
            st.parts.append(
                Part(f"memorydb {c.name}", "in-process", me, f"{host}:{port}",
                     str(self.path("memorydb", c.name)), f"valkey pids {nodes}")
            )  # fmt: skip
            agent = agent_in[c.region]
            st.databases.append(
                Database(c.database, c.name, c.region, c.env, c.team, c.vpc_id,
                         f"{c.endpoint}:{c.port}", f"{host}:{port}", agent)
            )  # fmt: skip
        st.pids = [p.pid for p in st.parts if p.kind == "process"]
        st.ports = [*nats_ports, _port(self.moto.url), self.auth_port,
                    *self.agent_ports.values(), *self.diag_ports.values()]  # fmt: skip
        for standin in self.standins.values():
            st.pids += [n.proc.pid for n in standin.nodes if n.proc is not None]
            st.ports += [p for _, p in standin.node_fronts] + [standin.endpoint[1]]
            st.ports += [p for n in standin.nodes for p in (n.port, n.bus_port)]
        st.env = {  # FLEETGATE_NATS_URL, with a password, is added by sandbox env
            **self.aws_env,
            "AWS_CONFIG_FILE": str(self.path("config", "no-aws-config")),
            "AWS_SHARED_CREDENTIALS_FILE": str(self.path("config", "no-aws-credentials")),
            "FLEETGATE_CA_DIR": str(self.path("ca")),
            "FLEETGATE_SANDBOX_DIR": str(self.dir),
            "FLEETGATE_SANDBOX_AUTH": f"127.0.0.1:{self.auth_port}",
        }
        if self.nats_ca_file is not None:
            st.env["FLEETGATE_NATS_CA_FILE"] = str(self.nats_ca_file)
        st.save()
        st.write_env()

    def child_exits(self) -> list[str]:
        """Children that exited while the sandbox runs (each reported once)."""
        out = []
        for name, child in list(self.children.items()):
            code = child.exited()
            if code is not None and not self.stopping:
                out.append(f"{name} exited with code {code} (see {child.log})")
                del self.children[name]
        return out

    # -- stop ----------------------------------------------------------------------------
    async def stop(self) -> list[str]:
        """Stop everything started, children first (agents remove their heartbeats while
        NATS still runs); a part that fails to stop does not keep the others running.
        Returns notes on parts that had to be killed or failed to stop."""
        self.stopping = True
        notes: list[str] = []
        if self._keeper is not None:
            self._keeper.cancel()
            await asyncio.gather(self._keeper, return_exceptions=True)
        await asyncio.gather(*self._threads, return_exceptions=True)
        started = list(self.children.values())
        for child in started:
            child.terminate()
        for note in await asyncio.gather(*(c.wait() for c in started)):
            if note:
                notes.append(note)
        for unfollow in self._unfollow:
            unfollow()
        await asyncio.gather(*(s.stop() for s in self.standins.values()), return_exceptions=True)
        moto, bus, nats, fleet = self.moto, self.bus, self.nats, self.fleet
        steps: list[tuple[str, Callable[[], Awaitable[None]]]] = [
            ("aws (moto)", lambda: asyncio.to_thread(moto.stop) if moto else _nothing()),
            ("the NATS client", lambda: bus.close() if bus else _nothing()),
            ("nats-server", lambda: asyncio.to_thread(nats.stop) if nats else _nothing()),
            ("the NATS servers", lambda: asyncio.to_thread(fleet.stop) if fleet else _nothing()),
        ]
        for what, step in steps:
            try:
                await asyncio.wait_for(step(), 15)
            except Exception as exc:
                notes.append(f"{what} did not stop cleanly: {exc!r}")
        return notes


async def _all_or_nothing(steps: Sequence[asyncio.Future[None]]) -> None:
    """Wait for every step; the first failure is raised (the caller cancels the rest)."""
    pending = set(steps)
    while pending:
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
        for step in done:
            step.result()


async def _answers(port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1)
    except (OSError, TimeoutError):
        return False
    itself = reached_itself(writer.get_extra_info("socket"))
    writer.close()
    return not itself


async def _nothing() -> None:
    return None


def count_of(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].rstrip("/"))
