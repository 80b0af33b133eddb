"""Agent-join setup for the tests: a fleet made by the real commands (``auth init``,
``roles create``), ``auth run`` and ``agent run`` as processes with their logs, a client
identity from the fleet CA, and nats-server with the production config (the auth
callout) for agents that log in to NATS as themselves."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import nats.aio.client
import pytest

from bus.access import Identity
from bus.server import NatsServer
from dbservice.access.ca import CertificateAuthority, cert_pem, key_pem, new_key
from dbservice.auth.admin import write_identity
from sandbox.ports import free_port
from tests.e2e.test_access_process import fleetgate
from tests.kits.common import CALLOUT_SEED, SAMPLE_NATS_CONF, sample_nats_passwords

ROLE = "kind: role\nname: dev\nallow: {db_labels: {env: dev}, db_users: [app]}\n"
"""The role the fleets here create: user ``app`` of databases labelled ``env=dev``."""


def secured_nats(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NatsServer]:
    """For a fixture: nats-server running deploy/nats/nats-server.conf (the users'
    passwords ``pw-<user>``, the callout issuer :data:`CALLOUT_SEED`), stopped after."""
    sample_nats_passwords(monkeypatch)
    server = NatsServer(tmp / "nats", config_file=SAMPLE_NATS_CONF).start()
    try:
        yield server
    finally:
        server.stop()


async def nats_login(url: str) -> str:
    """ "ok", or the reason the server gave for refusing the login."""
    client = nats.aio.client.Client()
    try:
        await client.connect(url, allow_reconnect=False, max_reconnect_attempts=0)
    except Exception as exc:
        return str(exc) or type(exc).__name__
    finally:
        await client.close()
    return "ok"


def callout_seed_file(tmp: Path) -> Path:
    """:data:`CALLOUT_SEED` in a 0600 file, for ``nats_callout.issuer_seed_file``."""
    seed = tmp / "nats-callout.seed"
    seed.write_bytes(CALLOUT_SEED + b"\n")
    seed.chmod(0o600)
    return seed


class JoinFleet:
    """A fleet CA made by ``fleetgate auth init`` and the role :data:`ROLE`, with
    ``env`` (an admin's environment); the auth service and agents started here run as
    processes logging to ``tmp/<name>.log``. As a context manager it stops them all on
    exit; :attr:`returncodes` are their exit codes then."""

    def __init__(self, tmp: Path, env: dict[str, str]) -> None:
        self.tmp = tmp
        self.env = env
        self.ca_dir = tmp / "ca"
        init = self.run("auth", "init", "--dir", str(self.ca_dir))
        assert init.returncode == 0, init.stderr
        match = re.search(r"SHA256:[0-9a-f]{64}", init.stdout)
        assert match is not None, init.stdout
        self.fingerprint = match.group()
        (tmp / "role.yaml").write_text(ROLE)
        created = self.run("roles", "create", "-f", str(tmp / "role.yaml"))
        assert created.returncode == 0, created.stderr
        self.auth = ""
        """The auth service's ``HOST:PORT`` once :meth:`start_auth` has run."""
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.returncodes: list[int | None] = []

    def run(
        self, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """``fleetgate ARGS`` to its end (as the admin, unless ``env``)."""
        return fleetgate(self.env if env is None else env, *args)

    async def run_async(
        self, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """:meth:`run` in a thread, so that this event loop's tasks go on meanwhile."""
        return await asyncio.to_thread(self.run, *args, env=env)

    def start(self, name: str, *args: str, env: dict[str, str] | None = None) -> None:
        """``fleetgate ARGS`` as the process ``name``, logging to ``tmp/<name>.log``."""
        with (self.tmp / f"{name}.log").open("wb") as log:
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "fleetgate", *args],
                env=self.env if env is None else env,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text()

    async def wait_listening(self, name: str, port: int, limit: float = 60) -> None:
        """Until the process ``name`` accepts connections on ``port``; its log if it
        exits first or the time runs out."""
        await asyncio.to_thread(self._wait_listening, name, port, limit)

    def _wait_listening(self, name: str, port: int, timeout: float) -> None:
        proc = self.procs[name]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited ({proc.returncode}):\n{self.log(name)}")
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"{name} did not listen on {port} in {timeout}s:\n{self.log(name)}")

    async def start_auth(
        self, *, cert_ttl: str = "1h", extra: str = "", env: dict[str, str] | None = None
    ) -> str:
        """``auth run`` (process ``auth``) with this CA, agents' certificates of
        ``cert_ttl`` and the ``extra`` YAML; its ``HOST:PORT`` once it listens."""
        port = free_port()
        config = self.tmp / "auth.yaml"
        config.write_text(
            f"listen: 127.0.0.1:{port}\nca_dir: {self.ca_dir}\njoin: {{cert_ttl: {cert_ttl}}}\n"
            + extra
        )
        self.start("auth", "auth", "run", "-c", str(config), env=env)
        await self.wait_listening("auth", port, 20)
        self.auth = f"127.0.0.1:{port}"
        return self.auth

    def agent_config(
        self, name: str, db_port: int, *, token: str | None = None, method: str = "token"
    ) -> tuple[Path, int]:
        """An agent config (``tmp/<name>.yaml``) joining at :attr:`auth` with ``token``
        (or ``method``) and serving ``dev-cache`` (env=dev) at ``db_port``; its path and
        the port it listens on."""
        join: dict[str, Any] = {"auth": self.auth, "ca_fingerprint": self.fingerprint}
        if token is not None:
            (self.tmp / f"{name}-token").write_text(token + "\n")
            join["token_file"] = str(self.tmp / f"{name}-token")
        else:
            join["method"] = method
        port = free_port()
        config = {
            "db_service": {
                "hostname": name,
                "data_dir": str(self.tmp / name),
                "listen_addr": f"127.0.0.1:{port}",
                "listener": {},
                "join": join,
                "databases": [{"name": "dev-cache", "uri": f"127.0.0.1:{db_port}",
                               "static_labels": {"env": "dev"}, "tls": {"mode": "disabled"}}],
            }
        }  # fmt: skip
        path = self.tmp / f"{name}.yaml"
        path.write_text(json.dumps(config))
        return path, port

    async def start_agent(
        self, name: str, config: Path, port: int, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """``agent run -c config`` as the process ``name``, once it listens on ``port``."""
        self.start(name, "agent", "run", "-c", str(config), env=env)
        await self.wait_listening(name, port)
        return self.procs[name]

    def identity(self, user: str = "alice", roles: tuple[str, ...] = ("dev",)) -> Path:
        """A client identity folder (key, certificate, CA) from the fleet CA."""
        ca = CertificateAuthority.load(self.ca_dir)
        key = new_key()
        cert = ca.issue_client(key.public_key(), Identity(user=user, roles=roles), 600)
        folder = self.tmp / user
        write_identity(folder, key_pem(key), cert_pem(cert), ca.pem)
        return folder

    def stop(self) -> list[int | None]:
        """SIGTERM to the processes still running, last started first; their exit codes
        in the order they were started (None: it outlived SIGTERM and was killed)."""
        killed: set[str] = set()
        for name, proc in reversed(self.procs.items()):
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                killed.add(name)
                print(f"{name} outlived SIGTERM:\n{self.log(name)}")
        self.returncodes = [
            None if name in killed else proc.returncode for name, proc in self.procs.items()
        ]
        return self.returncodes

    def __enter__(self) -> JoinFleet:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
