"""The auth service's diagnostics listener (``diag_addr``): a real ``fleetgate auth run``
process, real logins with ``fleetgate login``; ``/metrics`` counts them by outcome."""

from __future__ import annotations

import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bus.server import NatsServer
from sandbox.ports import free_port
from tests.e2e.test_access_process import (
    auth_with_alice,
    fleetgate,
    wait_listening,
)
from tests.kits.common import stopped_log


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.mark.slow
def test_auth_metrics_count_logins_by_outcome(nats_server: NatsServer, tmp_path: Path) -> None:
    env, ca_dir = auth_with_alice(nats_server, tmp_path)
    port, diag = free_port(), free_port()
    config = tmp_path / "auth.yaml"
    config.write_text(f"listen: 127.0.0.1:{port}\nca_dir: {ca_dir}\ndiag_addr: 127.0.0.1:{diag}\n")
    server = subprocess.Popen(
        [sys.executable, "-m", "fleetgate", "auth", "run", "-c", str(config)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_listening(port, server)
        status, body = get(diag, "/readyz")
        assert status == 200, body
        assert "ok   listener" in body
        assert get(diag, "/healthz")[0] == 200
        auth, ca_file = f"127.0.0.1:{port}", str(ca_dir / "ca.crt")
        for password in ("wrong password", "a long password"):
            fleetgate(env, "login", "--auth", auth, "--user", "alice", "--password-stdin",
                      "--ca-file", ca_file, stdin=password + "\n")  # fmt: skip
        status, text = get(diag, "/metrics")
        assert status == 200
        got = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
        login = "fleetgate_auth_logins_total"
        assert got[(login, (("endpoint", "password"), ("outcome", "ok")))] == 1
        assert got[(login, (("endpoint", "password"), ("outcome", "denied")))] == 1
        assert got[("fleetgate_auth_certificates_issued_total", (("endpoint", "password"),))] == 1
        assert got[("fleetgate_auth_rate_limited_requests_total", ())] == 0
        assert "alice" not in text
    finally:
        log = stopped_log(server)
    assert server.returncode == 0, log
