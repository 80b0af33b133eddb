"""Discovery against moto's real HTTP server and a real nats-server."""

from __future__ import annotations

import json
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bus import Bus, DbServerHeartbeat, FetcherStatus
from bus.server import NatsServer
from discovery.aws.session import AwsSession
from discovery.poller import Poller, PollReport
from discovery.settings import DiscoveryService
from fleetgate.cli import main
from sandbox.aws import MotoServer
from tests.kits import seed as seed
from tests.kits.agent import wait_until
from tests.kits.discovery import discovery_processes

ACCOUNT = "123456789012"
OTHER = "222222222222"
ROLE = f"arn:aws:iam::{OTHER}:role/fleetgate-discovery"


def settings(*matchers: dict[str, Any], group: str = "") -> DiscoveryService:
    return DiscoveryService.model_validate({"discovery_group": group, "aws": list(matchers)})


def matcher(*regions: str, **extra: Any) -> dict[str, Any]:
    return {"types": ["memorydb"], "regions": list(regions), **extra}


@pytest.fixture
async def poll(aws: MotoServer, bus: Bus) -> AsyncIterator[Any]:
    """poll(settings) -> PollReport, with one AWS session per test (like one process)."""
    session = AwsSession(max_attempts=2)
    pollers: dict[int, Poller] = {}

    async def run(cfg: DiscoveryService) -> PollReport:
        poller = pollers.setdefault(id(cfg), Poller(settings=cfg, bus=bus, session=session))
        return await poller.poll_once()

    yield run


async def names(bus: Bus) -> list[str]:
    return [r.name for r in await bus.list_resources()]


async def test_several_regions_labels_and_tls_filter(poll: Any, bus: Bus) -> None:
    east = seed.network("us-east-1")
    west = seed.network("eu-west-1", cidr="10.1.0.0/16")
    seed.cluster("us-east-1", "orders", net=east, tags={"env": "prod", "team": "pay"})
    seed.cluster("eu-west-1", "carts", net=west, tags={"env": "staging"})
    seed.cluster("eu-west-1", "plain", net=west, tags={"env": "prod"}, tls=False)
    seed.cluster("us-east-1", "devbox", net=east, tags={"env": "dev"})

    cfg = settings(matcher("us-east-1", "eu-west-1", tags={"env": ["prod", "stag*"]}))
    report = await poll(cfg)
    assert report.ok
    assert await names(bus) == [
        f"carts-memorydb-eu-west-1-{ACCOUNT}",
        f"orders-memorydb-us-east-1-{ACCOUNT}",
    ]
    carts = await bus.get_resource(f"carts-memorydb-eu-west-1-{ACCOUNT}")
    assert carts is not None
    assert carts.metadata.labels["vpc-id"] == west.vpc_id
    assert carts.metadata.labels["region"] == "eu-west-1"
    assert carts.metadata.labels["account-id"] == ACCOUNT
    assert carts.spec.uri.startswith("clustercfg.carts.")
    assert carts.spec.aws is not None and carts.spec.aws.memorydb is not None
    assert carts.spec.aws.memorydb.cluster_name == "carts"
    assert carts.spec.aws.memorydb.acl_name == "open-access"


async def test_cross_account_through_assume_role(poll: Any, bus: Bus) -> None:
    creds = seed.assume(ROLE, "ext-1")
    net = seed.network("us-west-2", creds=creds)
    seed.cluster("us-west-2", "theirs", net=net, creds=creds, tags={"env": "prod"})
    seed.cluster("us-west-2", "ours", tags={"env": "prod"})

    cfg = settings(matcher("us-west-2", assume_role_arn=ROLE, external_id="ext-1"))
    assert (await poll(cfg)).ok
    (only,) = await bus.list_resources()
    assert only.name == f"theirs-memorydb-us-west-2-{OTHER}"
    assert only.metadata.labels["account-id"] == OTHER
    assert only.spec.aws is not None
    assert only.spec.aws.assume_role_arn == ROLE and only.spec.aws.external_id == "ext-1"
    statuses = await bus.list_fetcher_status()
    assert [(s.account_id, s.state) for s in statuses] == [(OTHER, "ok")]


async def test_tag_changes_update_rename_and_unmatch(poll: Any, bus: Bus) -> None:
    c = seed.cluster("us-east-1", "orders", tags={"env": "prod", "team": "a"})
    cfg = settings(matcher("us-east-1", tags={"env": "prod"}))
    await poll(cfg)
    name = f"orders-memorydb-us-east-1-{ACCOUNT}"
    seed.tag("us-east-1", c["ARN"], {"team": "b"})
    report = await poll(cfg)
    assert [r.name for r in report.plan.puts] == [name]
    got = await bus.get_resource(name)
    assert got is not None and got.metadata.labels["team"] == "b"

    seed.tag("us-east-1", c["ARN"], {"FleetgateDatabaseName": "orders"})
    await poll(cfg)
    assert await names(bus) == ["orders"]

    seed.tag("us-east-1", c["ARN"], {"env": "dev"})
    await poll(cfg)
    assert await names(bus) == []


async def test_a_tag_warning_is_given_once_per_poller_not_per_poll(
    aws: MotoServer, bus: Bus, caplog: pytest.LogCaptureFixture
) -> None:
    seed.cluster("us-east-1", "orders", tags={"region": "mars"})
    cfg = settings(matcher("us-east-1"))
    session = AwsSession(max_attempts=2)
    first = Poller(settings=cfg, bus=bus, session=session)
    for _ in range(2):
        assert (await first.poll_once()).ok
    assert caplog.text.count("overridden by the computed label") == 1
    # A new poller (a restarted discovery process) names it again: the set of warnings
    # given belongs to the poller, not to the module.
    assert (await Poller(settings=cfg, bus=bus, session=session).poll_once()).ok
    assert caplog.text.count("overridden by the computed label") == 2


async def test_deleted_cluster_is_removed_and_unchanged_poll_writes_nothing(
    poll: Any, bus: Bus
) -> None:
    seed.cluster("us-east-1", "a", tags={"env": "prod"})
    seed.cluster("us-east-1", "b", tags={"env": "prod"})
    cfg = settings(matcher("us-east-1"))
    first = await poll(cfg)
    assert first.registry_writes == 2 and first.status_writes == 1
    again = await poll(cfg)
    assert again.registry_writes == 0 and again.status_writes == 0
    seed.delete("us-east-1", "a")
    report = await poll(cfg)
    assert report.plan.deletes == [f"a-memorydb-us-east-1-{ACCOUNT}"]
    assert await names(bus) == [f"b-memorydb-us-east-1-{ACCOUNT}"]


async def test_pagination_past_100_clusters(poll: Any, bus: Bus) -> None:
    for i in range(130):
        seed.cluster("us-east-1", f"c{i:03d}")
    session_calls: dict[str, int] = {}
    report = await poll(settings(matcher("us-east-1")))
    assert report.ok
    assert len(await names(bus)) == 130
    counted = report.aws_calls
    session_calls = {"total": counted}
    # 2 pages of DescribeClusters + 130 ListTags + subnets + users + identity
    assert counted <= 130 * 1.05, session_calls


async def test_aws_unreachable_deletes_nothing_and_fails(
    poll: Any, bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed.cluster("us-east-1", "keep", tags={"env": "prod"})
    cfg = settings(matcher("us-east-1"))
    assert (await poll(cfg)).ok
    before = await bus.list_resources()

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    report = await Poller(settings=cfg, bus=bus, session=AwsSession(max_attempts=1)).poll_once()
    assert not report.ok
    assert report.plan.deletes == [] and report.plan.puts == []
    assert await bus.list_resources() == before
    (status,) = await bus.list_fetcher_status()
    assert status.state == "failed"
    assert "cannot reach AWS at http://127.0.0.1:9" in status.error
    assert status.last_success is not None  # from the earlier good poll


async def test_access_denied_fetcher_keeps_resources_and_records_status(
    poll: Any, bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds = seed.assume(ROLE)
    seed.cluster("us-east-1", "theirs", creds=creds)
    cfg = settings(matcher("us-east-1", assume_role_arn=ROLE))
    assert (await poll(cfg)).ok
    # The role's credentials stop working: throttled/denied/expired all look the same to us.
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    report = await Poller(settings=cfg, bus=bus, session=AwsSession(max_attempts=1)).poll_once()
    assert not report.ok and report.plan.deletes == []
    assert await names(bus) == [f"theirs-memorydb-us-east-1-{OTHER}"]
    statuses = {s.state: s for s in await bus.list_fetcher_status()}
    assert "failed" in statuses
    assert "AssumeRole" in statuses["failed"].error


async def test_groups_do_not_touch_each_other(poll: Any, bus: Bus) -> None:
    seed.cluster("us-east-1", "shared", tags={"env": "prod"})
    await poll(settings(matcher("us-east-1"), group="blue"))
    seed.delete("us-east-1", "shared")
    report = await poll(settings(matcher("us-east-1"), group="green"))
    assert report.plan.deletes == []
    (kept,) = await bus.list_resources()
    assert kept.metadata.labels["fleetgate.dev/discovery-group"] == "blue"


async def test_edited_matcher_removes_what_it_no_longer_selects(poll: Any, bus: Bus) -> None:
    seed.cluster("us-east-1", "a", tags={"env": "prod"})
    seed.cluster("us-east-1", "b", tags={"env": "dev"})
    await poll(settings(matcher("us-east-1")))
    assert len(await names(bus)) == 2
    await poll(settings(matcher("us-east-1", tags={"env": "prod"})))
    assert await names(bus) == [f"a-memorydb-us-east-1-{ACCOUNT}"]


# -- the command line -----------------------------------------------------------------


def write_config(tmp_path: Path, nats_url: str, body: str) -> Path:
    path = tmp_path / "discovery.yaml"
    path.write_text(f"nats: {{url: {nats_url}}}\n{body}")
    return path


CONFIG = """
discovery_service:
  poll_interval: 1s
  aws:
    - types: ["memorydb"]
      regions: ["us-east-1"]
      tags: {"env": ["prod", "stag*"]}
"""


def test_cli_once_then_db_ls(
    aws: MotoServer,
    nats_server: NatsServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seed.cluster("us-east-1", "orders", tags={"env": "prod", "team": "pay"})
    seed.cluster("us-east-1", "carts", tags={"env": "staging", "team": "shop"})
    cfg = write_config(tmp_path, nats_server.url, CONFIG)
    assert main(["discovery", "run", "-c", str(cfg), "--once"]) == 0
    capsys.readouterr()

    assert (
        main(["db", "ls", "--nats", nats_server.url, "--format", "json", "--labels", "team=pay"])
        == 0
    )
    listed = json.loads(capsys.readouterr().out)
    assert [d["name"] for d in listed] == [f"orders-memorydb-us-east-1-{ACCOUNT}"]
    assert {"name", "protocol", "uri", "labels", "aws"} <= set(listed[0])
    assert listed[0]["labels"]["team"] == "pay"
    assert listed[0]["aws"]["memorydb"]["cluster_name"] == "orders"

    assert main(["db", "ls", "--nats", nats_server.url, "--wide"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "DESCRIPTION", "HEALTH", "LABELS"]
    import re

    cells = re.split(r"\s{2,}", lines[1])
    assert cells[:2] == [f"carts-memorydb-us-east-1-{ACCOUNT}", "MemoryDB cluster in us-east-1"]
    assert cells[2] == "0/0"  # no agent serves it
    assert "env=staging" in cells[3] and "fleetgate.dev/" not in lines[1]
    assert cells[3].startswith("env=staging, team=shop, region=us-east-1, engine=")  # env first
    assert f"account-id={ACCOUNT}" in cells[3] and "vpc-id=vpc-" in cells[3]  # --wide: all

    monkeypatch.setenv("COLUMNS", "100")  # without --wide: fits the terminal
    assert main(["db", "ls", "--nats", nats_server.url]) == 0
    narrow = capsys.readouterr().out.splitlines()
    assert len(narrow) == len(lines) and max(map(len, narrow)) <= 100
    assert narrow[1].startswith(f"carts-memorydb-us-east-1-{ACCOUNT} ")
    assert narrow[1].endswith(" more") and "env=staging" in narrow[1]


def test_cli_errors_are_one_clear_line(
    aws: MotoServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "discovery_service:\n  aws:\n    - types: [memorydb]\n      regions: us-east-1\n"
    )
    assert main(["discovery", "run", "-c", str(bad), "--once"]) == 2
    err = capsys.readouterr().err
    assert "discovery_service.aws[0].regions" in err and "Traceback" not in err

    assert main(["discovery", "run", "-c", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err

    good = write_config(tmp_path, "nats://127.0.0.1:9", CONFIG)
    assert main(["discovery", "run", "-c", str(good), "--once"]) == 1
    assert "cannot reach NATS at nats://127.0.0.1:9" in capsys.readouterr().err

    assert main(["db", "ls", "--labels", "env", "--nats", "nats://127.0.0.1:9"]) == 2
    assert "--labels: 'env' is not KEY=VALUE" in capsys.readouterr().err


def test_cli_no_credentials(
    aws: MotoServer,
    nats_server: NatsServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    cfg = write_config(tmp_path, nats_server.url, CONFIG)
    assert main(["discovery", "run", "-c", str(cfg), "--once"]) == 1
    err = capsys.readouterr().err
    assert err.count("no AWS credentials found") == 1, err
    assert "AWS_PROFILE" in err


async def test_cli_service_polls_on_interval_and_stops_on_sigterm(
    aws: MotoServer, nats_server: NatsServer, bus: Bus, tmp_path: Path
) -> None:
    seed.cluster("us-east-1", "first", tags={"env": "prod"})
    with discovery_processes(tmp_path, nats_server.url, CONFIG) as service:
        proc = service.start()
        first, second = (f"{n}-memorydb-us-east-1-{ACCOUNT}" for n in ("first", "second"))
        await wait_until(lambda: _listed(bus, first), 20, "the first poll to enrol the cluster")
        seed.cluster("us-east-1", "second", tags={"env": "prod"})
        await wait_until(lambda: _listed(bus, second), 20, "a later poll to enrol the new one")

        def that_poll_ended() -> bool:
            log = service.log(proc)
            at = log.find(f"enrolled {second}")
            return at >= 0 and "poll done" in log[at:]

        # stopped between polls (the next test stops one in the middle of a poll)
        await wait_until(that_poll_ended, 20, "the end of that poll")
    assert proc.returncode == 0, service.log(proc)
    assert "Traceback" not in service.log(proc)


async def test_a_sigterm_in_the_middle_of_a_poll_stops_quietly(
    aws: MotoServer,
    nats_server: NatsServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """AWS that accepts and never answers holds the first poll; SIGTERM then stops the
    service at once, exit 0, with no traceback nor ERROR (apscheduler logged the
    cancelled job as a failure)."""
    hold = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{hold.getsockname()[1]}")
    try:
        with discovery_processes(tmp_path, nats_server.url, CONFIG) as service:
            proc = service.start()
            hold.settimeout(20)
            held.append(hold.accept()[0])  # the poll's first AWS call: it waits
            proc.send_signal(signal.SIGTERM)
            proc.wait(15)
            log = service.log(proc)
        assert proc.returncode == 0, log
        assert "Traceback" not in log and " ERROR " not in log, log
        assert "poll stopped" in log, log
    finally:
        for conn in held:
            conn.close()
        hold.close()


async def _listed(bus: Bus, name: str) -> bool:
    return name in await names(bus)


async def test_status_records_partial_when_tags_fail(
    poll: Any, bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = seed.cluster("us-east-1", "orders", tags={"env": "prod"})
    cfg = settings(matcher("us-east-1", tags={"env": "prod"}))
    await poll(cfg)
    seed.tag("us-east-1", c["ARN"], {"team": "new"})

    from discovery.aws import memorydb

    async def broken(self: Any, arn: str) -> dict[str, str]:
        from discovery.aws.errors import FetchThrottled

        raise FetchThrottled(f"ListTags {arn}: ThrottlingException: Rate exceeded")

    monkeypatch.setattr(memorydb.AioMemoryDB, "list_tags", broken)
    report = await poll(cfg)
    assert not report.ok and report.plan.puts == [] and report.plan.deletes == []
    got = await bus.get_resource(f"orders-memorydb-us-east-1-{ACCOUNT}")
    assert got is not None and "team" not in got.metadata.labels
    (status,) = await bus.list_fetcher_status()
    assert isinstance(status, FetcherStatus)
    assert status.state == "partial" and "ThrottlingException" in status.error


async def test_a_region_whose_agents_are_cut_off_keeps_its_databases(poll: Any, bus: Bus) -> None:
    """Discovery reads AWS, never the agents: when a region's leaf loses the hub, its
    agents' heartbeats expire in the hub, and the region's databases stay enrolled (they
    go only when AWS says the cluster is gone; a failed AWS call keeps them too)."""
    seed.cluster("eu-west-1", "cut", tags={"env": "prod"})
    cfg = settings(matcher("eu-west-1"))
    assert (await poll(cfg)).ok
    (resource,) = await bus.list_resources()
    heartbeat = DbServerHeartbeat(
        host_id="agent-eu", hostname="agent-eu", version="1", addr="10.0.0.1:6390",
        database=resource,
    )  # fmt: skip
    await bus.put_db_server(heartbeat, 1.0)

    async def expired() -> bool:
        return await bus.list_db_servers() == []

    await wait_until(expired, 10, "the heartbeat to expire")  # the region's agents are gone
    report = await poll(cfg)
    assert report.ok and report.plan.deletes == [] and report.registry_writes == 0
    assert await bus.list_resources() == [resource]
