"""The agent's pure parts: config validation, selection, aliases, the status machine,
the data directory; and the command line's answer to a bad config."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from bus.schemas import AWSSpec, DatabaseResource, DatabaseSpec, MemoryDBSpec, Metadata
from dbservice.agent.config import AgentConfig
from dbservice.agent.health import (
    HealthState,
    ProbeResult,
    TLSContexts,
    build_target,
    resolve_alias,
)
from dbservice.agent.identity import DataDir
from dbservice.agent.served import Selection, static_resource
from dbservice.gateway.settings import QueryAuditConfig
from dbservice.upstream.iam import Role
from fleetgate.addresses import split_host_port
from fleetgate.cli import main
from fleetgate.config import ConfigError, load_model

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def config(**service: Any) -> AgentConfig:
    body: dict[str, Any] = {"resources": [{"labels": {"env": "prod"}}]}
    body.update(service)
    return load_model(AgentConfig, {"db_service": body}, "agent.yaml")


def error_of(**service: Any) -> str:
    with pytest.raises(ConfigError) as info:
        config(**service)
    return str(info.value)


def test_defaults_and_durations() -> None:
    cfg = config(health_check={"interval": "1s", "timeout": 0.5}, heartbeat={"ttl": "1m"})
    s = cfg.db_service
    assert s.health_check.interval == 1.0 and s.health_check.timeout == 0.5
    assert s.health_check.healthy_threshold == 2 and s.health_check.unhealthy_threshold == 1
    assert s.heartbeat.interval == 10.0 and s.heartbeat.ttl == 60.0
    assert s.hostname and s.listen_addr == "0.0.0.0:6390"


def test_offline_grace_and_the_audit_spool_bound() -> None:
    assert config().db_service.offline_grace == 900.0
    assert config(offline_grace="1h").db_service.offline_grace == 3600.0
    assert "db_service.offline_grace" in error_of(offline_grace="-1s")
    assert QueryAuditConfig().spool_max_bytes == 1024**3
    assert QueryAuditConfig(spool_max_bytes="2GiB").spool_max_bytes == 2 * 1024**3
    with pytest.raises(ValidationError, match="spool_max_bytes"):
        QueryAuditConfig(spool_max_bytes="10KiB")


@pytest.mark.parametrize(
    ("service", "field", "hint"),
    [
        ({"health_check": {"interval": "500ms"}}, "db_service.health_check", "at least 1s"),
        (
            {"health_check": {"interval": "2s", "timeout": "3s"}},
            "db_service.health_check",
            "cannot be longer than interval",
        ),
        ({"health_check": {"healthy_threshold": 0}}, "healthy_threshold", "greater than"),
        ({"heartbeat": {"interval": "10s", "ttl": "15s"}}, "db_service.heartbeat", "twice"),
        ({"heartbeat": {"interval": "ten"}}, "db_service.heartbeat.interval", "not a duration"),
        ({"resources": [{"labels": {}}]}, "db_service.resources[0].labels", "matches nothing"),
        (
            {"resources": [{"labels": {"env": "^(prod$"}}]},
            "db_service.resources[0].labels",
            "not a valid regex",
        ),
        (
            {"resources": [{"labels": {"a": "b"}, "aws": {"assume_role_arn": "nope"}}]},
            "db_service.resources[0].aws.assume_role_arn",
            "not an IAM role ARN",
        ),
        ({"resources": [], "databases": []}, "db_service", "nothing to serve"),
        (
            {"databases": [{"name": "a", "uri": "h:1"}, {"name": "a", "uri": "h:2"}]},
            "db_service",
            "listed twice",
        ),
        ({"databases": [{"name": "Bad_Name", "uri": "h:1"}]}, "databases[0].name", "lower-case"),
        ({"databases": [{"name": "a", "uri": "h:99999"}]}, "databases[0].uri", "1 to 65535"),
        ({"databases": [{"name": "a", "uri": "redis://h:1"}]}, "databases[0].uri", "scheme"),
        (
            {"databases": [{"name": "a", "uri": "h:1", "tls": {"mode": "strict"}}]},
            "databases[0].tls.mode",
            "verify-full",
        ),
        (
            {"databases": [{"name": "a", "uri": "h:1", "tls": {"ca_file": "/no/such.pem"}}]},
            "databases[0].tls.ca_file",
            "cannot read /no/such.pem",
        ),
        ({"host_aliases": {"db.example": "x:y"}}, "db_service.host_aliases", "port must be"),
        ({"listen_addr": "6390"}, "db_service.listen_addr", "has no port"),
        ({"advertise_addr": "0.0.0.0:6390"}, "db_service.advertise_addr", "clients can reach"),
        ({"colour": "red"}, "db_service.colour", "unknown field"),
    ],
)
def test_bad_config_names_the_field(service: dict[str, Any], field: str, hint: str) -> None:
    message = error_of(**service)
    assert field in message and hint in message, message


def test_cli_bad_config_is_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = tmp_path / "agent.yaml"
    file.write_text("db_service:\n  heartbeat: {interval: 5s, ttl: 6s}\n  resources: []\n")
    assert main(["agent", "run", "-c", str(file)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fleetgate: error: ") and "Traceback" not in err
    assert "db_service.heartbeat" in err
    assert main(["agent", "run", "-c", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_host_port_forms() -> None:
    assert split_host_port("h:1") == ("h", 1)
    assert split_host_port("[::1]:6379") == ("::1", 6379)
    assert split_host_port("h", default_port=6379) == ("h", 6379)


def test_advertise_addr_is_derived_from_listen_addr() -> None:
    assert config(listen_addr="10.0.0.7:7000").db_service.advertise() == "10.0.0.7:7000"
    assert config(advertise_addr="a.example:1").db_service.advertise() == "a.example:1"
    derived = config(listen_addr="0.0.0.0:6390").db_service.advertise()
    assert derived.endswith(":6390") and not derived.startswith("0.0.0.0")


def test_host_aliases() -> None:
    aliases = config(
        host_aliases={"DB.example.com:6379": "127.0.0.1:7000", "other.example": "tunnel"}
    ).db_service.host_aliases
    assert resolve_alias("db.example.com", 6379, aliases) == ("127.0.0.1", 7000)
    assert resolve_alias("db.example.com", 6380, aliases) == ("db.example.com", 6380)
    assert resolve_alias("other.example", 6380, aliases) == ("tunnel", 6380)
    db = resource("x", {}, uri="db.example.com:6379")
    target = build_target(db, aliases=aliases, contexts=TLSContexts())
    # Dial the alias, but verify (and send SNI for) the database's own name.
    assert (target.address, target.server_name) == ("127.0.0.1:7000", "db.example.com")
    assert target.tls is not None


def resource(
    name: str, labels: dict[str, str], *, uri: str = "h:6379", tls: bool = True
) -> DatabaseResource:
    aws = AWSSpec(
        region="us-east-1",
        account_id="123456789012",
        memorydb=MemoryDBSpec(cluster_name=name, tls_enabled=tls),
    )
    return DatabaseResource(
        metadata=Metadata(name=name, labels=labels), spec=DatabaseSpec(uri=uri, aws=aws)
    )


def test_memorydb_without_tls_is_dialled_plain() -> None:
    target = build_target(resource("x", {}, tls=False), aliases={}, contexts=TLSContexts())
    assert target.tls is None and target.protocol == "TCP+RESP"


def test_selection_last_matching_role_wins_and_static_shadows() -> None:
    role_a = "arn:aws:iam::111111111111:role/a"
    role_b = "arn:aws:iam::222222222222:role/b"
    cfg = config(
        resources=[
            {"labels": {"env": "prod"}, "aws": {"assume_role_arn": role_a}},
            {
                "labels": {"team": "pay*"},
                "aws": {"assume_role_arn": role_b, "external_id": "ext-1"},
            },
            {"labels": {"vpc-id": "vpc-1"}},
        ],
        databases=[{"name": "cache", "uri": "127.0.0.1", "tls": {"mode": "disabled"}}],
    ).db_service
    selection = Selection(cfg.resources, [static_resource(d) for d in cfg.databases])
    both = resource("both", {"env": "prod", "team": "payments"})
    assert selection.select(both) == both  # served as in the registry, its own role kept
    assert selection.role(both) == Role(role_b, "ext-1")
    only_a = resource("a", {"env": "prod", "vpc-id": "vpc-1"})
    assert selection.select(only_a) == only_a
    assert selection.role(only_a) == Role(role_a)
    assert selection.role(resource("v", {"vpc-id": "vpc-1"})) is None
    assert selection.select(resource("none", {"env": "dev"})) is None
    assert selection.select(resource("cache", {"env": "prod"})) is None
    desired = selection.desired(
        [resource("cache", {"env": "prod"}), resource("p", {"env": "prod"})]
    )
    assert sorted(desired) == ["cache", "p"]
    assert desired["cache"].spec.uri == "127.0.0.1:6379"
    assert desired["cache"].metadata.labels["fleetgate.dev/origin"] == "config"


def test_status_machine_thresholds() -> None:
    state = HealthState(healthy_threshold=2, unhealthy_threshold=2)
    ok, bad = ProbeResult(True), ProbeResult(False, "connect: refused")
    assert (state.status, state.message) == ("unknown", "initialized")
    assert state.observe(ok, NOW) and state.status == "healthy"  # first result decides
    assert not state.observe(bad, NOW) and state.status == "healthy"
    assert state.message == "1 health check failed" and state.error == "connect: refused"
    assert state.observe(bad, NOW) and state.status == "unhealthy"
    assert state.message == "2 health checks failed"
    assert not state.observe(ok, NOW) and state.status == "unhealthy"
    assert not state.observe(bad, NOW)  # the streak starts over
    assert not state.observe(ok, NOW)
    assert state.observe(ok, NOW) and state.status == "healthy"
    snap = state.snapshot()
    assert snap.status == "healthy" and snap.transition_time == NOW
    assert snap.error == "connect: refused"  # the last error stays visible
    first_bad = HealthState(healthy_threshold=3, unhealthy_threshold=3)
    assert first_bad.observe(bad, NOW) and first_bad.status == "unhealthy"


def test_data_dir_keeps_host_id_and_refuses_a_second_agent(tmp_path: Path) -> None:
    first = DataDir.open(tmp_path / "data")
    with pytest.raises(ConfigError, match="another agent is running"):
        DataDir.open(tmp_path / "data")
    host_id = first.host_id
    first.close()
    again = DataDir.open(tmp_path / "data")
    assert again.host_id == host_id
    again.close()
    (tmp_path / "data" / "host_uuid").write_text("garbage")
    with pytest.raises(ConfigError, match="not a host id"):
        DataDir.open(tmp_path / "data")


def test_sample_config_is_valid() -> None:
    import yaml

    sample = Path(__file__).resolve().parents[2] / "deploy" / "agent.yaml"
    data = yaml.safe_load(sample.read_text())
    for db in data["db_service"]["databases"]:
        db.get("tls", {}).pop("ca_file", None)  # a path on the agent's host
    assert set(data["db_service"].pop("listener")) == {"cert_file", "key_file"}  # files there too
    cfg = load_model(AgentConfig, data, str(sample)).db_service
    assert cfg.advertise() == "10.0.1.5:6390" and len(cfg.resources) == 2
    assert resolve_alias("sessions.internal.example", 6380, cfg.host_aliases) == (
        "10.20.0.15",
        6380,
    )


def test_a_joining_agents_listener_uses_its_own_files_in_data_dir(tmp_path: Path) -> None:
    join = {"auth": "auth.internal", "token_file": str(tmp_path / "token")}
    static = [{"name": "cache", "uri": "127.0.0.1:6379", "tls": {"mode": "disabled"}}]
    config = load_model(
        AgentConfig,
        {"db_service": {"data_dir": str(tmp_path / "d"), "join": join, "listener": {},
                        "databases": static}},
        "agent.yaml",
    )  # fmt: skip
    listener = config.db_service.listener
    assert listener is not None and listener.from_join
    assert listener.cert_file == listener.key_file == tmp_path / "d" / "agent.pem"
    assert (
        config.db_service.join is not None and config.db_service.join.auth == "auth.internal:3025"
    )
    # what a listener process is given (the leader's config, dumped) reads back the same
    again = AgentConfig.model_validate(config.model_dump(mode="json"))
    assert again.db_service.listener == listener
    # without join, the files are still required and checked
    with pytest.raises(ConfigError, match="cert_file"):
        load_model(
            AgentConfig,
            {"db_service": {"listener": {}, "databases": static}},
            "agent.yaml",
        )
    with pytest.raises(ConfigError, match="ca_fingerprint"):
        load_model(
            AgentConfig,
            {"db_service": {"join": {**join, "ca_fingerprint": "abc"}, "databases": static}},
            "agent.yaml",
        )


def test_renewal_comes_at_two_thirds_of_the_life_from_the_issue() -> None:
    """The CA sets notBefore a minute back for clock skew: the life counts from the
    issue, or a short certificate would be renewed at once, again and again."""
    from dbservice.access.ca import CertificateAuthority, new_key
    from dbservice.agent.join import renew_delay

    ca = CertificateAuthority.create()
    cert = ca.issue_agent(new_key().public_key(), ["127.0.0.1"], 600, host_id="h")
    issued = cert.not_valid_after_utc - timedelta(seconds=600)
    delays = [renew_delay(cert, now=issued) for _ in range(200)]
    assert all(340 <= d <= 400 for d in delays), (min(delays), max(delays))
    assert max(delays) - min(delays) > 20  # jittered
    # a restart late in the life renews at once
    assert renew_delay(cert, now=issued + timedelta(seconds=500)) == 0
