"""Where a sandbox keeps its state, and how other commands find it.

Layout of the sandbox directory (default ``$FLEETGATE_HOME/sandbox``)::

    sandbox.json    the supervisor's pid, every part (pid, address, log), state
    sandbox.lock    held (flock) by the running supervisor: one sandbox per directory
    env             export lines: AWS_ENDPOINT_URL, ... for a shell (``sandbox env``
                    adds FLEETGATE_NATS_URL, with the shell's NATS password)
    alice.password  alice's generated password
    ops.password    the password of the stand-ins' password user ``ops``
    nats-users/     one generated password per NATS user of deploy/nats/nats-server.conf
    ca/             the fleet CA (``fleetgate auth init``), kept across runs
    tls/            the MemoryDB stand-ins' CA, and the agents' server certificates
    config/         the generated configs of discovery, the auth service and the agents
    logs/           one log per process; sandbox.out is what ``up`` printed
    nats/ memorydb/ agents/   NATS's store, the stand-ins' nodes, the agents' data dirs

Only the ``*.password`` files hold secrets; no log, config or state file does. Everything
is private to the person running the sandbox: directories 0700, files 0600.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shlex
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Literal
from urllib.parse import quote

from sandbox.ports import port_free

State = Literal["starting", "ready", "failed", "stopping", "stopped"]

STATE_FILE = "sandbox.json"
LOCK_FILE = "sandbox.lock"
ENV_FILE = "env"


NATS_USERS = ("discovery", "agent", "auth", "reader", "auditor", "operator", "admin")
"""The users of deploy/nats/nats-server.conf; the sandbox's NATS runs with that file."""
SHELL_NATS_USER = "operator"
"""Whom ``sandbox env`` logs a person's shell in as: what an operator gets in production
(reads the registry, heartbeats, managed-user records and the audit; writes nothing,
never reads password hashes). Provisioning (``users add``, ...) needs ``admin``,
whose password is in ``nats-users/admin.password``."""
PRIVATE_UMASK = 0o077
"""Files the sandbox (and every process it starts) creates are 0600, directories 0700."""


class SandboxError(Exception):
    """The sandbox cannot do what was asked; the message says why and what to do."""


def default_dir() -> Path:
    """``$FLEETGATE_HOME/sandbox`` (``~/.fleetgate/sandbox``), beside the login."""
    from client.login import fleetgate_home

    return fleetgate_home() / "sandbox"


def resolve_dir(flag: str | None) -> Path:
    return Path(flag).expanduser().absolute() if flag else default_dir()


@dataclass
class Part:
    """One running part: a child process, or something the supervisor hosts itself."""

    name: str
    kind: Literal["process", "in-process"]
    pid: int
    address: str = ""
    """What answers: a URL or host:port ("" when the part listens nowhere)."""
    log: str = ""
    detail: str = ""
    diag: str = ""
    """Its diagnostics listener (``/metrics``, ``/healthz``, ``/readyz``), as a URL."""


@dataclass
class Database:
    name: str
    cluster: str
    region: str
    env: str
    team: str
    vpc_id: str
    endpoint: str
    """The endpoint MemoryDB (moto) reports, which the stand-in's certificate names."""
    front: str
    """Where the stand-in listens (the agents' host alias for ``endpoint``)."""
    agent: str


@dataclass
class NatsNode:
    """One server of ``up --regions N``'s NATS: a hub server or a region's leaf node."""

    name: str
    role: Literal["hub", "leaf"]
    pid: int
    address: str
    """Its client URL (``tls://127.0.0.1:PORT``)."""
    monitor_port: int
    region: str = ""
    agents: list[str] = field(default_factory=list)
    """The agents connected to it (a leaf's region's)."""


@dataclass
class SandboxState:
    dir: str
    pid: int
    state: State = "starting"
    error: str = ""
    started_at: float = 0.0
    ready_seconds: float | None = None
    parts: list[Part] = field(default_factory=list)
    databases: list[Database] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    pids: list[int] = field(default_factory=list)
    """Every process the sandbox started (``down`` checks each is gone)."""
    ports: list[int] = field(default_factory=list)
    """Every loopback port the sandbox listens on (``down`` checks each is free)."""
    nats_servers: list[NatsNode] = field(default_factory=list)
    """With ``--regions``: the hub servers and the leaf nodes (else empty: one server)."""
    nats_ca_file: str = ""
    """With ``--regions``: the CA of the NATS servers' certificates (TLS everywhere)."""

    def save(self) -> None:
        """Write ``sandbox.json`` atomically."""
        path = Path(self.dir) / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        tmp.replace(path)

    def write_env(self) -> Path:
        path = Path(self.dir) / ENV_FILE
        lines = [f"export {k}={shlex.quote(v)}" for k, v in self.env.items()]
        path.write_text(
            '# fleetgate sandbox: eval "$(fleetgate sandbox env)"\n' + "\n".join(lines) + "\n"
        )
        return path

    @classmethod
    def load(cls, directory: Path) -> SandboxState | None:
        try:
            data: dict[str, Any] = json.loads((directory / STATE_FILE).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise SandboxError(f"{directory / STATE_FILE} is unreadable ({exc})") from None
        data["parts"] = [Part(**p) for p in data.get("parts", [])]
        data["databases"] = [Database(**d) for d in data.get("databases", [])]
        data["nats_servers"] = [NatsNode(**n) for n in data.get("nats_servers", [])]
        return cls(**data)


# -- secrets -----------------------------------------------------------------------------


def secret_file(path: Path) -> str:
    """The generated password kept in ``path`` (0600, in a 0700 directory) across runs;
    made on first use."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent, 0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        os.chmod(path, 0o600)
        return path.read_text().strip()
    value = secrets.token_urlsafe(18)
    with os.fdopen(fd, "w") as out:
        out.write(value + "\n")
    return value


def nats_password_file(directory: Path, user: str) -> Path:
    return directory / "nats-users" / f"{user}.password"


def nats_passwords(directory: Path) -> dict[str, str]:
    """Every NATS user's password (generated on first use), by user."""
    return {user: secret_file(nats_password_file(directory, user)) for user in NATS_USERS}


def nats_url_as(url: str, user: str, password: str) -> str:
    """``nats://127.0.0.1:4222`` -> ``nats://user:password@127.0.0.1:4222``."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{quote(user, safe='')}:{quote(password, safe='')}@{rest}"


def nats_url_of(directory: Path, state: SandboxState, user: str) -> str:
    """The sandbox's NATS URL logged in as ``user`` (its password read from its file);
    with ``--regions``, every hub server's, comma-separated."""
    hubs = [n.address for n in state.nats_servers if n.role == "hub"]
    urls = hubs or [p.address for p in state.parts if p.name == "nats" and p.address]
    if not urls:
        raise SandboxError(f"{directory / STATE_FILE} names no NATS: is the sandbox ready?")
    try:
        password = nats_password_file(directory, user).read_text().strip()
    except OSError as exc:
        raise SandboxError(f"cannot read the NATS password of {user}: {exc}") from None
    return ",".join(nats_url_as(url, user, password) for url in urls)


def make_private(directory: Path) -> None:
    """Directories 0700 and files 0600 under ``directory`` (what an earlier run left;
    new files are private through :data:`PRIVATE_UMASK`)."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(directory, 0o700)
    for root, dirs, files in os.walk(directory):  # never into a symlinked directory
        for name in dirs:
            path = os.path.join(root, name)
            if not os.path.islink(path):  # Linux cannot chmod a link itself
                with contextlib.suppress(OSError):
                    os.chmod(path, 0o700)
        for name in files:
            path = os.path.join(root, name)
            if os.path.isfile(path) and not os.path.islink(path):
                with contextlib.suppress(OSError):
                    os.chmod(path, 0o600)


# -- the lock: one supervisor per directory --------------------------------------------


@contextlib.contextmanager
def held_lock(directory: Path) -> Iterator[IO[str]]:
    """Hold ``sandbox.lock`` for the duration, or raise SandboxError when a supervisor
    already holds it."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    handle = (directory / LOCK_FILE).open("a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SandboxError(already_running(directory)) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield handle
    finally:
        handle.close()


def is_locked(directory: Path) -> bool:
    """Whether a supervisor holds the lock of ``directory`` now."""
    try:
        handle = (directory / LOCK_FILE).open("a+")
    except FileNotFoundError:
        return False
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def already_running(directory: Path) -> str:
    state = None
    with contextlib.suppress(SandboxError):
        state = SandboxState.load(directory)
    pid = f" (pid {state.pid}, {state.state})" if state else ""
    hint = "" if directory == default_dir() else f" --dir {directory}"
    return (
        f"a sandbox is already running in {directory}{pid}: see fleetgate sandbox status{hint}, "
        f"or stop it with fleetgate sandbox down{hint}"
    )


# -- processes and ports ----------------------------------------------------------------


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (exited, not yet reaped by its parent) counts as gone
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    return True


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def working_dir(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return ""


def names_dir(pid: int, directory: Path) -> bool:
    """Whether process ``pid`` belongs to ``directory``: its command line names it, or
    it works inside it (valkey-server rewrites its command line and runs in its --dir)."""
    d = str(directory)
    return d in cmdline(pid) or working_dir(pid).startswith(d + os.sep)


def check_chosen_port(port: int | None, flag: str) -> None:
    """A port the user chose must be free now; the error names it and the flag."""
    if port is not None and port != 0 and not port_free(port):
        raise SandboxError(
            f"port {port} (given with {flag}) is in use on 127.0.0.1: choose another, "
            f"or leave {flag} out for a free one"
        )
