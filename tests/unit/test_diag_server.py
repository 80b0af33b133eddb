"""The diagnostics listener on its own: /healthz turns 503 when the event loop was late
(a lag sample set by the test, not a timed stall), /readyz names the failing check,
/metrics is the Prometheus text format of the process's own registry."""

from __future__ import annotations

import aiohttp
from prometheus_client import CollectorRegistry, Counter

from fleetgate.metrics import UNRESPONSIVE, Check, DiagServer
from sandbox.ports import free_port


async def get(port: int, path: str) -> tuple[int, str, str]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{port}{path}") as resp,
    ):
        return resp.status, resp.headers["Content-Type"], await resp.text()


async def test_endpoints() -> None:
    registry = CollectorRegistry()
    Counter("things", "Things done", registry=registry).inc(3)
    checks = [Check("nats", True), Check("registry", False, "not read yet")]
    port = free_port()
    async with DiagServer(f"127.0.0.1:{port}", registry, lambda: checks, process="test") as diag:
        assert diag.port == port
        status, kind, body = await get(port, "/metrics")
        assert status == 200 and kind.startswith("text/plain")
        assert "things_total 3.0" in body
        assert "fleetgate_event_loop_lag_seconds" in body
        status, _, body = await get(port, "/readyz")
        assert status == 503
        assert body == "test: not ready\n  ok   nats\n  FAIL registry: not read yet\n"
        checks[1] = Check("registry", True)
        assert (await get(port, "/readyz"))[0] == 200
        status, _, body = await get(port, "/healthz")
        assert status == 200 and body.startswith("test: alive, event loop lag ")
        diag.lag.last = UNRESPONSIVE + 1
        status, _, body = await get(port, "/healthz")
        assert status == 503 and "unresponsive" in body and "6000.0 ms" in body
        assert (await get(port, "/nothing"))[0] == 404
