"""``fleetgate discovery run`` as processes, each logging to its own file."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from tests.kits.common import subprocess_env


class DiscoveryProcesses:
    """Discovery replicas of one config (``nats: {url}`` and ``body``), started as
    processes; :meth:`stop_all` (the context manager's exit) ends every one still
    running with SIGTERM (SIGCONT first, for a paused one), SIGKILL after 15 s."""

    def __init__(self, tmp_path: Path, nats_url: str, body: str) -> None:
        self.tmp_path = tmp_path
        self.config = tmp_path / "discovery.yaml"
        self.config.write_text(f"nats: {{url: {nats_url}}}\n{body}")
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> subprocess.Popen[bytes]:
        """One more replica; its log is :meth:`log`."""
        log = self.tmp_path / f"replica-{len(self.procs)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "fleetgate", "discovery", "run", "-c", str(self.config)],
                env=subprocess_env(),
                stdout=subprocess.DEVNULL,
                stderr=out,
            )
        self.procs.append(proc)
        return proc

    def log(self, proc: subprocess.Popen[bytes]) -> str:
        return (self.tmp_path / f"replica-{self.procs.index(proc)}.log").read_text()

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(OSError):
                    os.kill(proc.pid, signal.SIGCONT)
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def discovery_processes(tmp_path: Path, nats_url: str, body: str) -> Iterator[DiscoveryProcesses]:
    fleet = DiscoveryProcesses(tmp_path, nats_url, body)
    try:
        yield fleet
    finally:
        fleet.stop_all()
