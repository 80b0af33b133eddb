"""Discovery's diagnostics listener (``discovery_service.diag_addr``): a real
``fleetgate discovery run`` process against moto's HTTP server and a real nats-server;
``/readyz`` is 503 until NATS is reached and a poll has ended, ``/metrics`` counts the
poll, the AWS calls and the registry writes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bus import Bus
from bus.server import NatsServer
from discovery.aws.session import AwsSession
from discovery.matchers import expand
from discovery.poller import Poller
from discovery.settings import DiscoveryService
from sandbox.aws import MotoServer
from sandbox.ports import free_port
from tests.kits import seed as seed

pytestmark = pytest.mark.timeout(120)

SETTINGS = DiscoveryService.model_validate(
    {"aws": [{"types": ["memorydb"], "regions": ["us-east-1"]}]}
)
FETCHER = expand(SETTINGS.aws)[0].status_key  # memorydb.us-east-1.<matcher digest>


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def wait_for(check: object, what: str, limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_discovery_process_readiness_and_poll_metrics(
    aws: MotoServer, nats_server: NatsServer, tmp_path: Path
) -> None:
    seed.cluster("us-east-1", "orders", tags={"env": "prod"})
    seed.cluster("us-east-1", "carts", tags={"env": "prod"})
    diag = free_port()
    cfg = tmp_path / "discovery.yaml"
    cfg.write_text(
        f"nats: {{url: {nats_server.url}}}\n"
        "discovery_service:\n"
        "  poll_interval: 1h\n"
        f"  diag_addr: 127.0.0.1:{diag}\n"
        "  aws:\n"
        '    - types: ["memorydb"]\n'
        '      regions: ["us-east-1"]\n'
    )
    nats_server.stop()
    proc = subprocess.Popen(
        [sys.executable, "-m", "fleetgate", "discovery", "run", "-c", str(cfg)],
        env=dict(os.environ),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def answers() -> bool:
            try:
                get(diag, "/healthz")
            except OSError:
                return False
            return True

        wait_for(answers, "the diagnostics listener")
        status, body = get(diag, "/readyz")
        assert status == 503, body
        assert "FAIL nats: not connected to NATS" in body
        assert "FAIL last poll: no poll has ended yet" in body
        assert get(diag, "/healthz")[0] == 200
        nats_server.start()
        wait_for(lambda: get(diag, "/readyz")[0] == 200, "ready after the first poll")
        assert "ok   last poll: 1 fetchers ok" in get(diag, "/readyz")[1]

        got = samples(get(diag, "/metrics")[1])
        fetcher = (("fetcher", FETCHER),)
        assert got[("fleetgate_discovery_polls_total", (*fetcher, ("outcome", "ok")))] == 1
        assert got[("fleetgate_discovery_poll_duration_seconds_count", fetcher)] == 1
        assert got[("fleetgate_discovery_last_success_timestamp_seconds", fetcher)] > 0
        assert got[("fleetgate_discovery_resources_total", (("action", "written"),))] == 2
        assert got[("fleetgate_discovery_resources_total", (("action", "deleted"),))] == 0
        calls = {
            labels: value
            for (name, labels), value in got.items()
            if name == "fleetgate_discovery_aws_calls_total"
        }
        ok = {dict(k)["operation"]: v for k, v in calls.items() if dict(k)["outcome"] == "ok"}
        assert ok["memorydb:describe_clusters"] == 1
        assert ok["memorydb:list_tags"] == 2
        assert all(dict(k)["outcome"] == "ok" for k in calls), calls
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    assert "Traceback" not in err


async def test_failed_aws_calls_are_counted_by_outcome(
    aws: MotoServer, bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = SETTINGS
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    poller = Poller(settings=cfg, bus=bus, session=AwsSession(max_attempts=1))
    report = await poller.poll_once()
    assert not report.ok
    from prometheus_client import generate_latest

    got = samples(generate_latest(poller.metrics.registry).decode())
    fetcher = (("fetcher", FETCHER),)
    assert got[("fleetgate_discovery_polls_total", (*fetcher, ("outcome", "failed")))] == 1
    failed = [
        dict(labels)
        for (name, labels), value in got.items()
        if name == "fleetgate_discovery_aws_calls_total" and value
    ]
    assert failed and all(f["outcome"] == "failed" for f in failed), failed
    assert ("fleetgate_discovery_last_success_timestamp_seconds", fetcher) not in got
