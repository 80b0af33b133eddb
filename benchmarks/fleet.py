"""A real fleetgate fleet for the proxy benchmark, every part its own process.

* ``nats-server -js`` with the fleet CA, one role and one user in the registry;
* the MemoryDB stand-in's front door: TLS terminated in front of the benchmark's
  valkey-server, by haproxy (``bind ... ssl``, C, as MemoryDB's own TLS is) when it is
  installed, else by the sandbox's Python :class:`~sandbox.tlsfront.TLSFront`;
* ``fleetgate agent run`` serving the database ``bench`` (static, TLS verify-full to
  the front) with its client listener (certificate from ``fleetgate auth sign``);
* ``fleetgate auth run``, ``fleetgate login`` as the user ``bench``, and
  ``fleetgate db connect bench --db-user default --port P --no-exec``: the full path;
* with ``cluster=True``, a MemoryDB cluster stand-in: 3 cluster-mode valkey-servers, each
  behind its own TLS front (one haproxy process, a frontend per shard; nodes announce
  their fronts' ports, as :mod:`sandbox.memorydb` does), published in the registry as a
  MemoryDB cluster (``bench-cluster``) that the same agent serves with the cluster
  engine;
* :meth:`Fleet.start_haproxy_tls`: the peer proxy, haproxy in TCP mode with TLS on both
  sides (mutual TLS from the client with the fleet CA, TLS verified to the front).

The agent is reached directly with the route in the TLS server name
(``default.bench.fleetgate``) and the login's certificate: :meth:`Fleet.tls_args`.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from sandbox.ports import free_port

PASSWORD = "bench password"
DATABASE = "bench"
DB_USER = "default"
SERVER_NAME = f"{DB_USER}.{DATABASE}.fleetgate"
CLUSTER = "bench-cluster"
CLUSTER_SERVER_NAME = f"{DB_USER}.{CLUSTER}.fleetgate"
SHARDS = 3
ROOT = Path(__file__).resolve().parent.parent


def wait_port(port: int, what: str, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what}: nothing listens on port {port}")


@dataclass
class Fleet:
    tmp: Path
    valkey_port: int
    front_kind: str = ""
    nats: object | None = None
    nats_url: str = ""
    front_port: int = 0
    agent_port: int = 0
    auth_port: int = 0
    tunnel_port: int = 0
    cluster_front_ports: list[int] = field(default_factory=list)
    """The TLS fronts of the cluster's shards (``cluster=True``), in shard order."""
    cluster_nodes: list[object] = field(default_factory=list)
    """The cluster's :class:`~sandbox.valkeynode.ValkeyNode` s."""
    deny: tuple[str, ...] = ("FLUSHALL", "FLUSHDB")
    """Commands the role ``bench`` denies (none: the role does not limit commands)."""
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def home(self) -> Path:
        return self.tmp / "home"

    @property
    def identity(self) -> Path:
        return self.home / "identity"

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "FLEETGATE_HOME": str(self.home),
            "FLEETGATE_NATS_URL": self.nats_url,
            "PYTHONPATH": str(ROOT),
        }

    def pid(self, name: str) -> int:
        """The process id of one part: ``nats``, ``front``, ``agent``, ``auth``,
        ``tunnel``, ``cluster front``, ``haproxy TLS``."""
        if name == "nats":
            proc = getattr(self.nats, "proc", None)
            if proc is None:
                raise RuntimeError("nats-server is not running")
            return int(proc.pid)
        return self.procs[name].pid

    def tls_args(self) -> list[str]:
        """redis-benchmark / redis-cli options for mutual TLS straight to the agent."""
        ids = self.identity
        return [
            "--tls", "--sni", SERVER_NAME, "--cacert", str(ids / "ca.pem"),
            "--cert", str(ids / "cert.pem"), "--key", str(ids / "key.pem"),
        ]  # fmt: skip

    def cluster_tls_args(self) -> list[str]:
        """redis-benchmark options for mutual TLS to the agent, routed to the cluster."""
        args = self.tls_args()
        args[args.index(SERVER_NAME)] = CLUSTER_SERVER_NAME
        return args

    def front_tls_args(self) -> list[str]:
        """redis-benchmark options for TLS to the stand-in's front (no client certificate)."""
        return ["--tls", "--cacert", str(self.tmp / "front" / "ca.crt")]

    def cluster_pids(self) -> tuple[int, ...]:
        """The cluster's valkey-servers."""
        return tuple(int(node.proc.pid) for node in self.cluster_nodes)  # type: ignore[attr-defined]

    # -- start -----------------------------------------------------------------------

    def start(self, *, tunnel: bool = True, cluster: bool = False) -> Fleet:
        from bus.server import NatsServer

        nats = NatsServer(self.tmp / "nats").start()
        self.nats, self.nats_url = nats, nats.url
        asyncio.run(self._registry())
        self._front()
        if cluster:
            self._cluster()
        self._agent()
        if tunnel:
            self._auth()
            self._login()
            self._tunnel()
        return self

    async def _registry(self) -> None:
        from bus import Bus
        from bus.access import Role, User, put_role, put_user
        from bus.audit import ensure_audit_stream
        from dbservice.auth.admin import init_ca, sign_host
        from dbservice.auth.passwords import hash_password

        bus = await Bus.connect(self.nats_url, name="benchmark")
        try:
            await bus.provision()
            ca = (await init_ca(bus, self.tmp / "ca")).ca
            await ensure_audit_stream(bus)
            role: dict[str, object] = {
                "name": "bench",
                "allow": {"db_labels": {"purpose": "benchmark"}, "db_users": [DB_USER]},
            }
            if self.deny:
                role["deny"] = {"redis_commands": list(self.deny)}
            await put_role(bus, Role.model_validate(role))
            await put_user(
                bus, User(name="bench", roles=("bench",), password_hash=hash_password(PASSWORD))
            )
            sign_host(ca, ["127.0.0.1"], 86400, self.tmp / "agent-tls")
        finally:
            await bus.close()

    def _front(self) -> None:
        from sandbox.tlsca import TestCA

        directory = self.tmp / "front"
        ca = TestCA.create("benchmark stand-in CA")
        ca.write(directory)
        ca.issue_server_cert().write(directory, "server")
        self.front_port = free_port()
        self.front_kind = "haproxy TLS" if shutil.which("haproxy") else "Python TLSFront"
        self.procs["front"] = self._tls_fronts(
            directory, [(self.front_port, self.valkey_port)], "haproxy"
        )
        wait_port(self.front_port, "the stand-in's TLS front", self.procs["front"])

    def _cluster(self) -> None:
        """3 cluster-mode valkey-servers, each behind a TLS front announced to clients,
        the keys of the GET runs filled in, and the cluster in the registry."""
        from sandbox.memorydb import slot_ranges
        from sandbox.valkeynode import ValkeyNode

        directory = self.tmp / "front"
        self.cluster_front_ports = [free_port() for _ in range(SHARDS)]
        self.cluster_nodes = [
            ValkeyNode(index=i, directory=self.tmp / f"shard-{i}", client_port=port)
            for i, port in enumerate(self.cluster_front_ports)
        ]
        nodes: list[ValkeyNode] = self.cluster_nodes  # type: ignore[assignment]

        async def build() -> None:
            await asyncio.gather(*(node.start() for node in nodes))
            for epoch, (node, (first, last)) in enumerate(
                zip(nodes, slot_ranges(SHARDS), strict=True), start=1
            ):
                await node.command("CLUSTER", "SET-CONFIG-EPOCH", epoch)
                await node.command("CLUSTER", "ADDSLOTSRANGE", first, last)
            for node in nodes[1:]:
                await nodes[0].command("CLUSTER", "MEET", node.host, node.port, node.bus_port)
            deadline = time.monotonic() + 30
            while True:
                infos = [await node.command("CLUSTER", "INFO") for node in nodes]
                if all(b"cluster_state:ok" in i and b"cluster_known_nodes:3" in i
                       for i in infos if isinstance(i, bytes)):  # fmt: skip
                    return
                if time.monotonic() > deadline:
                    raise RuntimeError("the benchmark's cluster did not become ready")
                await asyncio.sleep(0.05)

        asyncio.run(build())
        fronts = zip(self.cluster_front_ports, nodes, strict=True)
        backends = [(port, node.port) for port, node in fronts]
        self.procs["cluster front"] = self._tls_fronts(directory, backends, "cluster-haproxy")
        for port in self.cluster_front_ports:
            wait_port(port, "the cluster's TLS front", self.procs["cluster front"])
        asyncio.run(self._publish_cluster())

    def fill_cluster(self, keys: list[bytes], value: bytes) -> None:
        """SET every key on the shard that owns its slot (straight to the nodes)."""
        import redis
        from redis.crc import key_slot

        from sandbox.memorydb import slot_ranges

        ranges = slot_ranges(SHARDS)
        clients = [redis.Redis(port=node.port) for node in self.cluster_nodes]  # type: ignore[attr-defined]
        pipes = [client.pipeline(transaction=False) for client in clients]
        for key in keys:
            slot = key_slot(key)
            shard = next(i for i, (first, last) in enumerate(ranges) if first <= slot <= last)
            pipes[shard].set(key, value)
        for pipe, client in zip(pipes, clients, strict=True):
            pipe.execute()
            client.close()

    async def _publish_cluster(self) -> None:
        from bus import AWSSpec, Bus, DatabaseResource, DatabaseSpec, MemoryDBSpec, Metadata
        from bus.schemas import TLSSettings

        resource = DatabaseResource(
            metadata=Metadata(name=CLUSTER, labels={"purpose": "benchmark"}),
            spec=DatabaseSpec(
                uri=f"127.0.0.1:{self.cluster_front_ports[0]}",
                tls=TLSSettings(mode="verify-full"),
                aws=AWSSpec(
                    region="us-east-1",
                    account_id="123456789012",
                    memorydb=MemoryDBSpec(
                        cluster_name=CLUSTER,
                        engine="valkey",
                        engine_version="7.2",
                        iam_users=(),  # "default" logs in as itself: no IAM token
                    ),
                ),
            ),
        )
        bus = await Bus.connect(self.nats_url, name="benchmark")
        try:
            await bus.put_resource(resource)
        finally:
            await bus.close()

    def _tls_fronts(
        self, directory: Path, fronts: list[tuple[int, int]], name: str
    ) -> subprocess.Popen[bytes]:
        """TLS fronts (listen port, valkey port) with the front CA's server certificate:
        one haproxy process (one thread, a frontend each), or the Python TLSFront."""
        cert, key = directory / "server.crt", directory / "server.key"
        if shutil.which("haproxy"):
            pem = directory / "server.pem"
            pem.write_bytes(cert.read_bytes() + key.read_bytes())
            text = (
                "global\n  nbthread 1\n  maxconn 8192\n"
                "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 1h\n"
                "  timeout server 1h\n"
            )
            for i, (port, upstream) in enumerate(fronts):
                text += (
                    f"frontend f{i}\n  bind 127.0.0.1:{port} ssl crt {pem}\n"
                    f"  default_backend b{i}\n"
                    f"backend b{i}\n  server s 127.0.0.1:{upstream}\n"
                )
            config = directory / f"{name}.cfg"
            config.write_text(text)
            command = ["haproxy", "-db", "-f", str(config)]
        else:
            me = str(Path(__file__).resolve())
            pairs = [str(p) for pair in fronts for p in pair]
            command = [sys.executable, me, "--_front", str(cert), str(key), *pairs]
        return subprocess.Popen(command, stdin=subprocess.PIPE, env=self.env())

    def start_haproxy_tls(self) -> int:
        """The peer proxy: haproxy in TCP mode, one thread, mutual TLS in (the agent's
        server certificate, client certificates checked against the fleet CA) and TLS
        out to the stand-in's front (chain verified against the front's CA); returns its
        port (the process: ``pid("haproxy TLS")``)."""
        port = free_port()
        directory = self.tmp / "haproxy-tls"
        directory.mkdir(exist_ok=True)
        tls = self.tmp / "agent-tls"
        pem = directory / "server.pem"
        pem.write_bytes((tls / "cert.pem").read_bytes() + (tls / "key.pem").read_bytes())
        config = directory / "haproxy.cfg"
        config.write_text(
            "global\n  nbthread 1\n  maxconn 8192\n"
            "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 1h\n"
            "  timeout server 1h\n"
            f"frontend f\n  bind 127.0.0.1:{port} ssl crt {pem} ca-file "
            f"{self.identity / 'ca.pem'} verify required\n  default_backend b\n"
            f"backend b\n  server s 127.0.0.1:{self.front_port} ssl verify required "
            f"ca-file {self.tmp / 'front' / 'ca.crt'}\n"
        )
        self.procs["haproxy TLS"] = subprocess.Popen(
            ["haproxy", "-db", "-f", str(config)], stdin=subprocess.PIPE, env=self.env()
        )
        wait_port(port, "haproxy with TLS on both sides", self.procs["haproxy TLS"])
        return port

    def python_tls_paths(self) -> list[str]:
        """For a Python forwarder doing haproxy TLS's work (``benchmarks/proxy.py``'s
        ``python TLS`` row): the agent's certificate and key, the fleet CA its clients'
        certificates are checked against, and the stand-in front's CA."""
        tls = self.tmp / "agent-tls"
        return [
            str(tls / "cert.pem"), str(tls / "key.pem"), str(self.identity / "ca.pem"),
            str(self.tmp / "front" / "ca.crt"),
        ]  # fmt: skip

    def _cluster_selection(self) -> dict[str, object]:
        """The agent's config for the registry's cluster: the matcher, the front's CA."""
        return {
            "resources": [{"labels": {"purpose": "benchmark"}}],
            "upstream_ca_file": str(self.tmp / "front" / "ca.crt"),
        }

    def _agent(self) -> None:
        self.agent_port = free_port()
        tls = self.tmp / "agent-tls"
        config = {
            "db_service": {
                "hostname": "bench-agent",
                "data_dir": str(self.tmp / "agent"),
                "listen_addr": f"127.0.0.1:{self.agent_port}",
                "advertise_addr": f"127.0.0.1:{self.agent_port}",
                "listener": {
                    "cert_file": str(tls / "cert.pem"),
                    "key_file": str(tls / "key.pem"),
                    "max_connections": 20_000,
                },
                **(self._cluster_selection() if self.cluster_nodes else {}),
                "databases": [
                    {
                        "name": DATABASE,
                        "uri": f"127.0.0.1:{self.front_port}",
                        "static_labels": {"purpose": "benchmark"},
                        "tls": {
                            "mode": "verify-full",
                            "ca_file": str(self.tmp / "front" / "ca.crt"),
                        },
                    }
                ],
                "health_check": {"interval": "5s", "timeout": "2s"},
                "heartbeat": {"interval": "5s", "ttl": "15s"},
            },
            "nats": {"url": self.nats_url},
        }
        path = self.tmp / "agent.yaml"
        path.write_text(yaml.safe_dump(config))
        log = (self.tmp / "agent.log").open("ab")
        self.procs["agent"] = subprocess.Popen(
            [sys.executable, "-m", "fleetgate", "agent", "run", "-c", str(path)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=self.env(),
        )  # fmt: skip
        wait_port(self.agent_port, "fleetgate agent run", self.procs["agent"])
        # The listener accepts before the CA is read; one routed PING says it is ready.
        deadline = time.monotonic() + 30
        self._agent_tls()  # the client certificate, before login
        names = [SERVER_NAME] + ([CLUSTER_SERVER_NAME] if self.cluster_nodes else [])
        for name in names:
            while True:
                answer = self._routed_ping(name)
                if answer == b"+PONG\r\n":
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the agent does not answer PING for {name}: {answer!r}")
                time.sleep(0.2)

    def _routed_ping(self, server_name: str = SERVER_NAME) -> bytes | str:
        """PING over mutual TLS straight to the agent, the route in the server name (no
        redis-cli with TLS needed)."""
        import ssl

        ids = self.identity
        context = ssl.create_default_context(cafile=str(ids / "ca.pem"))
        context.check_hostname = False
        context.load_cert_chain(ids / "cert.pem", ids / "key.pem")
        try:
            with (
                socket.create_connection(("127.0.0.1", self.agent_port), timeout=5) as raw,
                context.wrap_socket(raw, server_hostname=server_name) as conn,
            ):
                conn.sendall(b"PING\r\n")
                return conn.recv(64)
        except OSError as exc:
            return str(exc)

    def _agent_tls(self) -> list[str]:
        # Before login, a certificate issued here directly (as `auth sign --user` would).
        if not (self.identity / "cert.pem").exists():
            self._issue_client()
        return self.tls_args()

    def _issue_client(self) -> None:
        from bus.access import Identity
        from dbservice.access.ca import CertificateAuthority, cert_pem, key_pem, new_key
        from dbservice.auth.admin import write_identity

        ca = CertificateAuthority.load(self.tmp / "ca")
        key = new_key()
        cert = ca.issue_client(key.public_key(), Identity(user="bench", roles=("bench",)), 86400)
        write_identity(self.identity, key_pem(key), cert_pem(cert), ca.pem)

    def _auth(self) -> None:
        self.auth_port = free_port()
        config = {
            "listen": f"127.0.0.1:{self.auth_port}",
            "ca_dir": str(self.tmp / "ca"),
            "host_id": "bench-auth",
            "nats": {"url": self.nats_url},
        }
        path = self.tmp / "auth.yaml"
        path.write_text(yaml.safe_dump(config))
        log = (self.tmp / "auth.log").open("ab")
        self.procs["auth"] = subprocess.Popen(
            [sys.executable, "-m", "fleetgate", "auth", "run", "-c", str(path)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=self.env(),
        )  # fmt: skip
        wait_port(self.auth_port, "fleetgate auth run", self.procs["auth"])

    def _login(self) -> None:
        out = subprocess.run(
            [sys.executable, "-m", "fleetgate", "login", "--auth", f"127.0.0.1:{self.auth_port}",
             "--user", "bench", "--password-stdin", "--ca-file", str(self.tmp / "ca" / "ca.crt")],
            input=PASSWORD + "\n", capture_output=True, text=True, env=self.env(), check=False,
        )  # fmt: skip
        if out.returncode != 0:
            raise RuntimeError(f"fleetgate login failed: {out.stderr}")

    def _tunnel(self) -> None:
        self.tunnel_port = free_port()
        log = (self.tmp / "tunnel.log").open("ab")
        self.procs["tunnel"] = subprocess.Popen(
            [sys.executable, "-m", "fleetgate", "db", "connect", DATABASE, "--db-user", DB_USER,
             "--port", str(self.tunnel_port), "--no-exec"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=self.env(),
        )  # fmt: skip
        wait_port(self.tunnel_port, "fleetgate db connect", self.procs["tunnel"])

    # -- stop ------------------------------------------------------------------------

    def stop(self) -> None:
        for proc in reversed(list(self.procs.values())):
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if self.cluster_nodes:
            from sandbox.valkeynode import ValkeyNode

            nodes: list[ValkeyNode] = self.cluster_nodes  # type: ignore[assignment]

            async def stop_nodes() -> None:
                await asyncio.gather(*(node.stop() for node in nodes))

            asyncio.run(stop_nodes())
        if self.nats is not None:
            self.nats.stop()  # type: ignore[attr-defined]


async def _serve_front(cert: str, key: str, pairs: list[int]) -> None:
    """Python TLS fronts (listen port, upstream port) when haproxy is not installed."""
    import ssl

    from sandbox.tlsfront import TLSFront

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    for port, upstream in zip(pairs[::2], pairs[1::2], strict=True):
        front = TLSFront(context, [("127.0.0.1", upstream)], port=port, name="bench")
        await front.start()
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


if __name__ == "__main__" and sys.argv[1:2] == ["--_front"]:
    import uvloop

    sys.path.insert(0, str(ROOT))
    cert, key = sys.argv[2:4]
    uvloop.run(_serve_front(cert, key, [int(p) for p in sys.argv[4:]]))
