"""Request ids in the auth service: a real ``fleetgate --log-format json auth run``
process; its answers carry ``X-Request-Id`` (the caller's when sane, else a new one) and
its JSON log lines about a request carry the same ``request_id``."""

from __future__ import annotations

import json
import re
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from bus.server import NatsServer
from dbservice.access.ca import make_csr, new_key
from sandbox.ports import free_port
from tests.e2e.test_access_process import (
    auth_with_alice,
    fleetgate,
    wait_listening,
)
from tests.kits.common import stopped_log

GENERATED = re.compile(r"[0-9a-f]{32}")


def call(
    url: str, context: ssl.SSLContext, rid: str | None = None, body: dict[str, Any] | None = None
) -> tuple[int, str | None]:
    """The status and ``X-Request-Id`` of one request (POST with a JSON ``body``)."""
    request = urllib.request.Request(url, data=json.dumps(body).encode() if body else None)
    if rid is not None:
        request.add_header("X-Request-Id", rid)
    if body:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as resp:
            return resp.status, resp.headers.get("X-Request-Id")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("X-Request-Id")


@pytest.mark.slow
def test_requests_get_an_id_in_the_answer_and_the_json_logs(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    env, ca_dir = auth_with_alice(nats_server, tmp_path)
    port = free_port()
    config = tmp_path / "auth.yaml"
    config.write_text(f"listen: 127.0.0.1:{port}\nca_dir: {ca_dir}\n")
    server = subprocess.Popen(
        [sys.executable, "-m", "fleetgate", "auth", "run", "-c", str(config),
         "--log-format", "json"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    base = f"https://127.0.0.1:{port}"
    context = ssl.create_default_context(cafile=str(ca_dir / "ca.crt"))
    try:
        wait_listening(port, server)
        assert call(f"{base}/v1/ca", context, "trace-1.a:b_c") == (200, "trace-1.a:b_c")
        for insane in ("x" * 129, "a b", "é", ""):
            status, rid = call(f"{base}/v1/ca", context, insane)
            assert status == 200 and rid is not None and GENERATED.fullmatch(rid), insane
        status, rid = call(f"{base}/v1/ca", context)
        assert status == 200 and rid is not None and GENERATED.fullmatch(rid)
        assert call(f"{base}/nowhere", context, "trace-404") == (404, "trace-404")
        wrong = {"user": "alice", "password": "wrong", "csr": make_csr(new_key(), "alice")}
        assert call(f"{base}/v1/login", context, "trace-login", wrong) == (401, "trace-login")
        right = fleetgate(env, "login", "--auth", f"127.0.0.1:{port}", "--user", "alice",
                          "--password-stdin", "--ca-file", str(ca_dir / "ca.crt"),
                          stdin="a long password\n")  # fmt: skip
        assert right.returncode == 0, right.stderr
    finally:
        log = stopped_log(server)
    assert server.returncode == 0, log
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    refused = [x for x in lines if x["message"].startswith("login refused for 'alice'")]
    assert [(x["request_id"], x["client_addr"]) for x in refused] == [("trace-login", "127.0.0.1")]
    (issued,) = [x for x in lines if x["message"].startswith("login: alice from")]
    assert GENERATED.fullmatch(issued["request_id"])
    # lines about no request carry none
    assert all("request_id" not in x for x in lines if x not in refused and x is not issued)
