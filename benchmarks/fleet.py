"""A real fleetgate fleet for the proxy benchmark, every part its own process.

* ``nats-server -js`` with the fleet CA, one role and one user in the registry;
* the MemoryDB stand-in's front door: TLS terminated in front of the benchmark's
  valkey-server, by haproxy (``bind ... ssl``, C, as MemoryDB's own TLS is) when it is
  installed, else by the sandbox's Python :class:`~sandbox.tlsfront.TLSFront`;
* ``fleetgate agent run`` serving the database ``bench`` (static, TLS verify-full to
  the front) with its client listener (certificate from ``fleetgate auth sign``);
* ``fleetgate auth run``, ``fleetgate login`` as the user ``bench``, and
  ``fleetgate db connect bench --db-user default --port P --no-exec``: the full path.

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

PASSWORD = "bench password"
DATABASE = "bench"
DB_USER = "default"
SERVER_NAME = f"{DB_USER}.{DATABASE}.fleetgate"
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
        """The process id of one part: ``nats``, ``front``, ``agent``, ``auth``, ``tunnel``."""
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

    def front_tls_args(self) -> list[str]:
        """redis-benchmark options for TLS to the stand-in's front (no client certificate)."""
        return ["--tls", "--cacert", str(self.tmp / "front" / "ca.crt")]

    # -- start -----------------------------------------------------------------------

    def start(self, *, tunnel: bool = True) -> Fleet:
        from bus.server import NatsServer

        nats = NatsServer(self.tmp / "nats").start()
        self.nats, self.nats_url = nats, nats.url
        asyncio.run(self._registry())
        self._front()
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
        cert, key = ca.issue_server_cert().write(directory, "server")
        self.front_port = free_port()
        if shutil.which("haproxy"):
            self.front_kind = "haproxy TLS"
            pem = directory / "server.pem"
            pem.write_bytes(cert.read_bytes() + key.read_bytes())
            config = directory / "haproxy.cfg"
            config.write_text(
                "global\n  nbthread 1\n  maxconn 8192\n"
                "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 1h\n"
                "  timeout server 1h\n"
                f"frontend f\n  bind 127.0.0.1:{self.front_port} ssl crt {pem}\n"
                "  default_backend b\n"
                f"backend b\n  server s 127.0.0.1:{self.valkey_port}\n"
            )
            command = ["haproxy", "-db", "-f", str(config)]
        else:
            self.front_kind = "Python TLSFront"
            ports = (str(self.front_port), str(self.valkey_port))
            me = str(Path(__file__).resolve())
            command = [sys.executable, me, "--_front", *ports, str(cert), str(key)]
        self.procs["front"] = subprocess.Popen(command, stdin=subprocess.PIPE, env=self.env())
        wait_port(self.front_port, "the stand-in's TLS front", self.procs["front"])

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
        while True:
            answer = self._routed_ping()
            if answer == b"+PONG\r\n":
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the agent does not answer PING: {answer!r}")
            time.sleep(0.2)

    def _routed_ping(self) -> bytes | str:
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
                context.wrap_socket(raw, server_hostname=SERVER_NAME) as conn,
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
        if self.nats is not None:
            self.nats.stop()  # type: ignore[attr-defined]


async def _serve_front(port: int, upstream: int, cert: str, key: str) -> None:
    import ssl

    from sandbox.tlsfront import TLSFront

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    front = TLSFront(context, [("127.0.0.1", upstream)], port=port, name="bench")
    await front.start()
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


if __name__ == "__main__" and sys.argv[1:2] == ["--_front"]:
    import uvloop

    sys.path.insert(0, str(ROOT))
    port, upstream, cert, key = sys.argv[2:6]
    uvloop.run(_serve_front(int(port), int(upstream), cert, key))
