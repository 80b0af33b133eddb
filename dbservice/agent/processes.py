"""Several processes accepting clients on one address (``listener.processes``, Linux).

The agent process (the *leader*) binds ``listen_addr`` with ``SO_REUSEPORT`` and starts
``processes - 1`` *listener processes*: ``fleetgate agent run --listener-process K``,
handed the leader's validated config, NATS URL, host_id and pid on stdin (so a config file
edited meanwhile cannot make them serve something else). Each binds the same address
with ``SO_REUSEPORT`` once it has read the registry, and the kernel spreads new
connections over the sockets.

A listener process runs :class:`~dbservice.agent.app.Agent` in listener-only mode: the
registry watch and selection, the fleet CA, roles, IAM and managed-user logins, audit
and the cluster engine; no health checks, heartbeats, password rotation or cleanup.

:class:`ListenerProcesses` is the leader's side: start each, log it, restart one that
exits with backoff, and on stop SIGTERM them, wait, SIGKILL the stragglers. A listener
process exits by itself when its leader dies (:func:`follow_leader`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from dbservice.agent.config import AgentConfig
from dbservice.agent.supervisor import BACKOFF, HEALTHY_RUN
from dbservice.agent.worker import wait_event
from fleetgate.addresses import split_host_port
from fleetgate.backoff import backoff_delay
from fleetgate.config import ConfigError, load_model

logger = logging.getLogger(__name__)

STOP_TIMEOUT = 10.0
"""How long the leader waits for its listener processes to stop before SIGKILL (each
ends its sessions in about 2 s and flushes its audit events for up to 5 s)."""
LEADER_CHECK = 1.0
"""Seconds between a listener process's looks at whether its leader is still there."""
PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class ListenerProcess:
    """What a listener process gets from its leader (on stdin, as JSON)."""

    index: int
    """K, from 1 (the leader is 0)."""
    host_id: str
    """The agent's host_id: audit events name the agent, not the process."""
    leader_pid: int
    config: dict[str, Any]
    """The leader's config, validated there (JSON-ready)."""
    nats: dict[str, Any] = field(default_factory=dict)
    """The NATS settings the leader uses, after its flag and environment (here, not on
    the command line: a URL may hold a password, and anyone on the host can read a
    command line). Secrets themselves stay in their files (or FLEETGATE_NATS_PASSWORD,
    which the listener process inherits)."""

    def encode(self) -> bytes:
        return json.dumps(
            {
                "host_id": self.host_id,
                "leader_pid": self.leader_pid,
                "config": self.config,
                "nats": self.nats,
            }
        ).encode()

    @classmethod
    def decode(cls, index: int, data: bytes) -> tuple[ListenerProcess, AgentConfig]:
        """ConfigError when ``data`` is not what a leader sends (the flag is internal)."""
        try:
            body = json.loads(data)
            spec = cls(
                index,
                str(body["host_id"]),
                int(body["leader_pid"]),
                body["config"],
                dict(body.get("nats") or {}),
            )
        except (ValueError, KeyError, TypeError):
            raise ConfigError(
                "--listener-process is for the agent's own use: the agent starts listener "
                "processes itself (set db_service.listener.processes)"
            ) from None
        return spec, load_model(AgentConfig, spec.config, f"listener process {index}")


def check_address_free(listen_addr: str) -> None:
    """ConfigError when something already listens on ``listen_addr``. With SO_REUSEPORT
    a second agent of the same user could otherwise share the port unnoticed."""
    host, port = split_host_port(listen_addr)
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        raise ConfigError(
            f"db_service.listen_addr {listen_addr}: cannot listen "
            f"({os.strerror(exc.errno) if exc.errno else exc})"
        ) from None


def die_with_leader() -> None:
    """Ask Linux to SIGTERM this process when its parent exits (best effort; the
    periodic check of :func:`follow_leader` covers the rest)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


async def follow_leader(leader_pid: int) -> None:
    """Return when the leader is gone (this process has another parent then)."""
    # Polling: no event says that the parent is gone.
    while os.getppid() == leader_pid:  # noqa: ASYNC110
        await asyncio.sleep(LEADER_CHECK)
    logger.warning("the agent process (pid %d) is gone; this listener process stops", leader_pid)


class _ProcessTag(logging.Filter):
    def __init__(self, index: int) -> None:
        super().__init__()
        self.suffix = f"[listener-{index}]"

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.endswith(self.suffix):
            record.name += self.suffix
        return True


def tag_logs(index: int) -> None:
    """Mark this process's log lines (``dbservice.gateway.listener[listener-1]: ...``):
    they go to the leader's stderr, between its own."""
    for handler in logging.getLogger().handlers:
        handler.addFilter(_ProcessTag(index))


def describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit status {code}"


class ListenerProcesses:
    """The leader's listener processes 1..count-1: started, restarted, stopped."""

    def __init__(
        self,
        count: int,
        *,
        spec: ListenerProcess,
        argv: Sequence[str],
        backoff: tuple[float, ...] = BACKOFF,
        stop_timeout: float = STOP_TIMEOUT,
    ) -> None:
        self.count = count
        self.spec = spec
        self.argv = list(argv)
        """The command without ``--listener-process K``."""
        self.backoff = backoff
        self.stop_timeout = stop_timeout
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        """Running listener processes by index."""
        self.restarts = 0
        self._stopping = asyncio.Event()
        self._keepers: list[asyncio.Task[None]] = []
        self._signalled: set[int] = set()

    @property
    def pids(self) -> dict[int, int]:
        return {k: p.pid for k, p in self.procs.items() if p.returncode is None}

    def start(self) -> None:
        self._keepers = [
            asyncio.create_task(self._keep(index), name=f"listener-process-{index}")
            for index in range(1, self.count)
        ]

    async def _spawn(self, index: int) -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            *self.argv,
            "--listener-process",
            str(index),
            stdin=asyncio.subprocess.PIPE,
        )
        assert proc.stdin is not None
        spec = replace(self.spec, index=index)
        try:
            proc.stdin.write(spec.encode())
            await proc.stdin.drain()
            proc.stdin.close()
        except (BrokenPipeError, ConnectionResetError):
            pass  # it exited at once; its exit status tells why
        return proc

    async def _keep(self, index: int) -> None:
        attempt = 0
        while not self._stopping.is_set():
            began = time.monotonic()
            try:
                proc = await self._spawn(index)
            except OSError as exc:
                ended = f"cannot start it: {exc.strerror or exc}"
            else:
                self.procs[index] = proc
                if self._stopping.is_set():  # the stop began while it was starting
                    self.signal_stop()
                else:
                    logger.info("listener process %d started (pid %d)", index, proc.pid)
                code = await proc.wait()
                if self._stopping.is_set():
                    return
                ended = f"pid {proc.pid}, {describe_exit(code)}"
            if time.monotonic() - began > HEALTHY_RUN:
                attempt = 0
            delay = backoff_delay(self.backoff, attempt)
            attempt += 1
            self.restarts += 1
            logger.error(
                "listener process %d ended unexpectedly (%s); restarting in %gs",
                index,
                ended,
                delay,
            )
            await wait_event(self._stopping, delay)

    def signal_stop(self) -> None:
        """SIGTERM every listener process (they stop as the agent does). Once: a second
        SIGTERM could find a process past its own stop, where it kills."""
        self._stopping.set()
        for proc in self.procs.values():
            if proc.returncode is None and proc.pid not in self._signalled:
                self._signalled.add(proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)

    async def aclose(self) -> None:
        """Stop them all and wait for them: SIGTERM, ``stop_timeout``, then SIGKILL."""
        self.signal_stop()
        keepers, self._keepers = self._keepers, []
        if not keepers:
            return
        _, late = await asyncio.wait(keepers, timeout=self.stop_timeout)
        if late:
            for proc in self.procs.values():
                if proc.returncode is None:
                    logger.warning(
                        "listener process (pid %d) did not stop within %gs; killing it",
                        proc.pid,
                        self.stop_timeout,
                    )
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
            _, late = await asyncio.wait(late, timeout=self.stop_timeout)
            for keeper in late:  # cannot happen short of a kernel bug; do not hang on it
                keeper.cancel()
        for index, proc in sorted(self.procs.items()):
            if proc.returncode not in (0, None):
                logger.info("listener process %d: %s", index, describe_exit(proc.returncode))
