"""Replicas and placement of the buckets and the audit stream, against real servers: R1
on one server, R3 on the hub cluster of deploy/nats/hub.conf, and an existing stream
that differs from a process's config refused with what differs and how to migrate."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import yaml
from nats.js.api import KeyValueConfig, StorageType

from bus import Bus, DatabaseResource, DatabaseSpec, Metadata, RegistryError, subjects
from bus.audit import ensure_audit_stream
from bus.client import kv_stream_name
from bus.server import NatsServer
from bus.specs import BUCKETS, DATABASES, SPECS, Replication
from fleetgate.cli import main
from fleetgate.cli.jetstream import provision
from fleetgate.config import ConfigError, JetStreamSettings, load_model
from tests.kits.common import ROOT
from tests.kits.natscluster import NatsTopology

RECORD = DatabaseResource(metadata=Metadata(name="x"), spec=DatabaseSpec(uri="x:6379"))


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NatsTopology]:
    topology = NatsTopology(tmp_path / "nats", regions=())
    topology.trust(monkeypatch)
    with topology:
        yield topology


@pytest.fixture
async def hub_admin(hub: NatsTopology) -> AsyncIterator[Bus]:
    async with await Bus.connect(hub.hub_urls("admin"), name="admin") as bus:
        yield bus


async def replication_of(bus: Bus, stream: str) -> tuple[int, str | None, int]:
    """(replicas configured, cluster placement, copies the cluster reports)."""
    info = await bus.js.stream_info(stream)
    placement = info.config.placement
    copies = 1 + len(info.cluster.replicas or []) if info.cluster is not None else 1
    return (
        info.config.num_replicas or 1,
        placement.cluster if placement is not None else None,
        copies,
    )


async def test_one_server_gets_r1_by_default(bus: Bus) -> None:
    await bus.provision()
    await ensure_audit_stream(bus)
    for name in BUCKETS:
        assert (await replication_of(bus, kv_stream_name(name)))[0] == 1
    assert (await replication_of(bus, subjects.AUDIT_STREAM))[0] == 1


async def test_r3_asked_of_one_server_says_why_it_cannot_be(nats_server: NatsServer) -> None:
    async with await Bus.connect(nats_server.url, name="r3") as bus:
        bus.replication = Replication(3)
        with pytest.raises(RegistryError) as raised:
            await bus.provision(DATABASES)
    message = str(raised.value)
    assert "cannot create bucket fleetgate_databases with 3 replicas" in message
    assert "one nats-server holds 1 replica" in message
    assert "jetstream: in a process's config" in message


async def test_the_hub_keeps_three_copies_of_every_bucket_and_the_audit_stream(
    hub_admin: Bus,
) -> None:
    hub_admin.replication = Replication(3, cluster="fleetgate-hub")
    await hub_admin.provision(*SPECS.values())
    await ensure_audit_stream(hub_admin)
    for name in SPECS:
        assert await replication_of(hub_admin, kv_stream_name(name)) == (3, "fleetgate-hub", 3)
    assert await replication_of(hub_admin, subjects.AUDIT_STREAM) == (3, "fleetgate-hub", 3)
    # the buckets work as before
    await hub_admin.put(subjects.DATABASES_BUCKET, "db.x", RECORD)
    assert await hub_admin.get(subjects.DATABASES_BUCKET, "db.x", DatabaseResource)


async def test_an_existing_bucket_with_other_replicas_is_refused_with_how_to_migrate(
    hub_admin: Bus, hub: NatsTopology
) -> None:
    # R1, made by an older fleetgate (nats-py's create_key_value) before the move to a hub
    await hub_admin.js.create_key_value(
        config=KeyValueConfig(bucket=DATABASES.name, storage=StorageType.FILE)
    )
    await ensure_audit_stream(hub_admin)
    async with await Bus.connect(hub.hub_urls("admin"), name="r3 process") as configured:
        configured.replication = Replication(3)
        with pytest.raises(RegistryError) as raised:
            await configured.provision(DATABASES)
        message = str(raised.value)
        assert message.startswith("bucket fleetgate_databases exists with 1 replica, ")
        assert "configured for 3 replicas (jetstream: in its config)" in message
        assert "fleetgate jetstream provision --replicas 3 --migrate" in message
        assert "nats stream edit KV_fleetgate_databases --replicas 3" in message
        with pytest.raises(RegistryError, match="the audit stream FLEETGATE_AUDIT exists with 1"):
            await ensure_audit_stream(configured, update=False)
        # never changed behind the admin's back
        assert (await replication_of(hub_admin, kv_stream_name(DATABASES.name)))[0] == 1

    # the admin migrates in place; then the process starts
    assert await provision(hub.hub_urls("admin"), Replication(3), migrate=True) == 0
    assert (await replication_of(hub_admin, kv_stream_name(DATABASES.name)))[0] == 3
    assert (await replication_of(hub_admin, subjects.AUDIT_STREAM))[0] == 3
    info = await hub_admin.js.stream_info(kv_stream_name(DATABASES.name))
    assert info.config.allow_direct  # every copy answers reads
    async with await Bus.connect(hub.hub_urls("admin"), name="r3 process") as configured:
        configured.replication = Replication(3)
        await configured.provision(DATABASES)
        await ensure_audit_stream(configured, update=False)


async def test_a_placement_that_differs_is_refused_too(hub_admin: Bus, hub: NatsTopology) -> None:
    hub_admin.replication = Replication(3)
    await hub_admin.provision(DATABASES)
    async with await Bus.connect(hub.hub_urls("admin"), name="placed") as configured:
        configured.replication = Replication(3, cluster="fleetgate-hub", tags=("ssd",))
        with pytest.raises(RegistryError) as raised:
            await configured.provision(DATABASES)
    assert "exists with 3 replicas, but this process is configured for 3 replicas in " in str(
        raised.value
    )
    assert "--replicas 3 --cluster fleetgate-hub --tag ssd --migrate" in str(raised.value)


async def test_changing_the_audit_retention_keeps_its_replicas(
    hub_admin: Bus, hub: NatsTopology
) -> None:
    """The auth service sets the audit stream's retention at every start: with no
    ``jetstream:`` in its config it must leave an R3 stream R3."""
    hub_admin.replication = Replication(3)
    await ensure_audit_stream(hub_admin, max_age=86400.0)
    async with await Bus.connect(hub.hub_urls("admin"), name="auth") as unconfigured:
        await ensure_audit_stream(unconfigured, max_age=7 * 86400.0)
    info = await hub_admin.js.stream_info(subjects.AUDIT_STREAM)
    assert info.config.max_age == 7 * 86400.0
    assert info.config.num_replicas == 3


def test_the_jetstream_block_of_a_config() -> None:
    settings = load_model(
        JetStreamSettings,
        {"replicas": 3, "placement": {"cluster": "hub", "tags": ["ssd"]}},
        "agent.yaml",
    )
    assert settings.replication() == Replication(3, "hub", ("ssd",))
    assert load_model(JetStreamSettings, {}, "x").replication() == Replication()
    with pytest.raises(ConfigError) as raised:
        load_model(JetStreamSettings, {"replicas": 2}, "agent.yaml")
    assert "replicas: Input should be 1, 3 or 5" in str(raised.value)


@pytest.mark.parametrize("sample", ["agent", "discovery", "auth"])
def test_the_sample_configs_jetstream_block_reads(sample: str) -> None:
    """Each process's sample config shows a commented ``jetstream:`` block: uncommented,
    it is what that process reads."""
    from dbservice.agent.config import AgentConfig
    from dbservice.auth.service import AuthConfig
    from discovery.settings import DiscoveryConfig

    model = {"agent": AgentConfig, "discovery": DiscoveryConfig, "auth": AuthConfig}[sample]
    text = (ROOT / "deploy" / f"{sample}.yaml").read_text()
    block = text[text.index("# jetstream:") :]
    uncommented = "\n".join(line.removeprefix("# ") for line in block.splitlines())
    data = yaml.safe_load(text[: text.index("# jetstream:")] + uncommented)
    assert "jetstream" in model.model_fields
    settings = load_model(JetStreamSettings, data["jetstream"], sample)
    assert settings.replication() == Replication(3, "fleetgate-hub")


def test_provision_says_per_bucket_what_it_did_as_json(
    nats_server: NatsServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """``jetstream provision --format json``: one object per bucket and the audit stream
    with what was done (created, kept, migrated); the text is one line each, as before."""

    async def old_bucket() -> None:  # an older fleetgate's bucket: no direct gets
        async with await Bus.connect(nats_server.url, name="old") as bus:
            await bus.js.create_key_value(
                config=KeyValueConfig(bucket=DATABASES.name, storage=StorageType.FILE)
            )

    asyncio.run(old_bucket())
    argv = ["jetstream", "provision", "--nats", nats_server.url]
    assert main([*argv, "--format", "json"]) == 0
    first = json.loads(capsys.readouterr().out)
    names = [*SPECS, "audit"]
    assert [d["name"] for d in first] == names
    assert [d["stream"] for d in first] == [*map(kv_stream_name, SPECS), subjects.AUDIT_STREAM]
    assert {d["replication"] for d in first} == {"1 replica"}
    assert {d["name"]: d["action"] for d in first} == {
        n: "kept" if n == DATABASES.name else "created" for n in names
    }
    assert main([*argv, "--migrate", "--format", "json"]) == 0
    migrated = json.loads(capsys.readouterr().out)
    assert {d["name"]: d["action"] for d in migrated} == {
        n: "migrated" if n == DATABASES.name else "kept" for n in names
    }
    assert main(argv) == 0
    assert capsys.readouterr().out.splitlines() == [
        *(f"bucket {name}: 1 replica" for name in SPECS),
        "the audit stream: 1 replica",
    ]
