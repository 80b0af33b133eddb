"""The agent's config file, validated with errors that name the field."""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from bus.labels import check_selector, is_valid_label_key
from bus.settings import START_WAIT
from bus.settings import NatsSettings as BusNatsSettings
from dbservice.gateway.settings import (
    MAX_PROCESSES as MAX_PROCESSES,
)
from dbservice.gateway.settings import (
    ListenerConfig as ListenerConfig,
)
from dbservice.gateway.settings import (
    QueryAuditConfig as QueryAuditConfig,
)
from dbservice.gateway.settings import (
    check_processes as check_processes,
)
from fleetgate.addresses import HostPort, check_host, join_host_port, split_host_port
from fleetgate.config import JetStreamSettings, Strict, check_external_id, check_role_arn
from fleetgate.durations import Duration

_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,126}[a-z0-9])?$")

DEFAULT_DATA_DIR = "/var/lib/fleetgate/agent"
DEFAULT_PORT = 6379


class NatsSettings(BusNatsSettings):
    """How the agent reaches NATS (:class:`bus.settings.NatsSettings`), and for how long
    it tries at start."""

    start_wait: Duration = START_WAIT
    """How long to keep trying to reach NATS at start (it may be starting beside us)."""


class AwsRole(Strict):
    """How the agent reaches the AWS APIs of the databases a matcher selects."""

    assume_role_arn: str | None = None
    external_id: str | None = None

    @field_validator("assume_role_arn")
    @classmethod
    def _role(cls, arn: str | None) -> str | None:
        return check_role_arn(arn)

    @model_validator(mode="after")
    def _external_id_needs_role(self) -> AwsRole:
        check_external_id(self.assume_role_arn, self.external_id)
        return self


class SecretStore(Strict):
    """Where the passwords of managed MemoryDB users are kept (AWS Secrets Manager)."""

    key_prefix: str = "fleetgate/"
    """Secret names are ``<key_prefix>memorydb/<region>/<account>/user/<name>``."""
    kms_key_id: str | None = None
    """KMS key of new secrets (default: the account's ``aws/secretsmanager`` key)."""

    @field_validator("key_prefix")
    @classmethod
    def _prefix(cls, prefix: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9/_+=.@-]{0,400}", prefix):
            raise ValueError(f"{prefix!r}: use letters, digits and /_+=.@- (example: fleetgate/)")
        return prefix


class ResourceMatcher(Strict):
    """Registry databases whose labels match are served (same semantics as discovery)."""

    labels: dict[str, str | list[str]]
    aws: AwsRole | None = None
    """Applied to the databases this matcher selects; the last matching matcher wins."""
    secret_store: SecretStore | None = None
    """Where managed users' passwords of these databases are kept (default:
    ``managed_users.secret_store``)."""

    @field_validator("labels")
    @classmethod
    def _labels(cls, labels: dict[str, str | list[str]]) -> dict[str, str | list[str]]:
        if not labels:
            raise ValueError("an empty selector matches nothing; use {'*': '*'} to serve all")
        check_selector(labels)
        return labels


class TLSConfig(Strict):
    """How the agent speaks TLS to a static database."""

    mode: Literal["verify-full", "verify-ca", "insecure", "disabled"] = "verify-full"
    ca_file: Path | None = None
    """PEM bundle trusted besides the system roots."""
    server_name: str | None = None
    """Name to verify and send as SNI instead of the host of ``uri``."""

    @field_validator("ca_file")
    @classmethod
    def _ca_file(cls, path: Path | None) -> Path | None:
        return _readable_pem(path)


def _readable_pem(path: Path | None) -> Path | None:
    if path is None:
        return None
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    if "-----BEGIN CERTIFICATE-----" not in text:
        raise ValueError(f"{path} holds no PEM certificate")
    return path


class StaticDatabase(Strict):
    """A database served from this config (e.g. self-hosted Valkey), not the registry."""

    name: str
    protocol: Literal["redis"] = "redis"
    uri: str
    """``host:port`` (the port defaults to 6379)."""
    description: str = ""
    static_labels: dict[str, str] = Field(default_factory=dict)
    tls: TLSConfig = TLSConfig()

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not _NAME.match(name):
            raise ValueError(
                f"{name!r}: use lower-case letters, digits and '-' (example: cache-local)"
            )
        return name

    @field_validator("uri")
    @classmethod
    def _uri(cls, uri: str) -> str:
        for scheme in ("redis://", "rediss://", "valkey://", "valkeys://"):
            if uri.startswith(scheme):
                raise ValueError(f"{uri!r}: give host:port without a scheme; set TLS with tls.mode")
        host, port = split_host_port(uri, default_port=DEFAULT_PORT)
        return join_host_port(host, port)

    @field_validator("static_labels")
    @classmethod
    def _labels(cls, labels: dict[str, str]) -> dict[str, str]:
        for key in labels:
            if not is_valid_label_key(key):
                raise ValueError(f"{key!r} is not a valid label key")
        return labels


class HealthCheckConfig(Strict):
    interval: Duration = 30.0
    """Time between probes (jittered by up to 1/7)."""
    timeout: Duration = 5.0
    """Limit of one whole probe: TCP connect, TLS handshake and PING."""
    healthy_threshold: int = Field(default=2, ge=1, le=100)
    unhealthy_threshold: int = Field(default=1, ge=1, le=100)

    @model_validator(mode="after")
    def _check(self) -> HealthCheckConfig:
        if self.interval < 1:
            raise ValueError("interval must be at least 1s")
        if self.timeout <= 0:
            raise ValueError("timeout must be more than 0s")
        if self.timeout > self.interval:
            raise ValueError("timeout cannot be longer than interval")
        return self


class HeartbeatConfig(Strict):
    interval: Duration = 10.0
    """Time between re-announcements of each served database (jittered)."""
    ttl: Duration = 30.0
    """A heartbeat not renewed within this time expires (whole seconds, rounded up)."""

    @model_validator(mode="after")
    def _check(self) -> HeartbeatConfig:
        if self.interval < 1:
            raise ValueError("interval must be at least 1s")
        if self.ttl < 2 * self.interval:
            raise ValueError(
                "ttl must be at least twice the interval, or a single late write lets "
                "a live agent's heartbeat expire"
            )
        return self


class ManagedUsersConfig(Strict):
    """MemoryDB users tagged ``fleetgate.dev/managed`` in the ACL of a served cluster get
    a password nobody sees, kept in Secrets Manager and rotated (docs/managed-users.md)."""

    enabled: bool = True
    interval: Duration = 900.0
    """Time between rotations of each user (plus up to 1/7 jitter)."""
    lease: Duration = 60.0
    """How long one agent may take for a rotation before another may take over."""
    refresh: Duration = 300.0
    """How often the ACLs and user tags are read again."""
    grace: Duration = 86400.0
    """A user no agent serves keeps its secret this long before cleanup deletes it."""
    cleanup: bool = True
    """Delete unused users' secrets after the grace period (else only by hand:
    ``fleetgate managed cleanup``)."""
    recovery_days: int | None = Field(default=7, ge=7, le=30)
    """Deleted secrets stay recoverable this many days (null: delete at once)."""
    acl_lookup: Literal["describe-acls", "describe-users"] = "describe-acls"
    """How ACL membership is read: DescribeACLs, or the ACLNames of DescribeUsers."""
    secret_store: SecretStore = SecretStore()

    @model_validator(mode="after")
    def _check(self) -> ManagedUsersConfig:
        if self.interval < 1:
            raise ValueError("interval must be at least 1s")
        if self.lease < 1:
            raise ValueError("lease must be at least 1s")
        if self.refresh < 1:
            raise ValueError("refresh must be at least 1s")
        return self


JOINED_IDENTITY_FILE = "agent.pem"
"""In data_dir: the joined agent's key and certificate in one file (0600), replaced at
once on renewal so the listener never reads a key and a certificate that do not match."""


class JoinConfig(Strict):
    """Get the listener's certificate from the auth service with a one-time token, and
    renew it there (docs/agents-join.md)."""

    auth: str
    """The auth service, ``HOST:PORT``."""
    method: Literal["token", "aws"] = "token"
    """How the agent proves it may join: a one-time token (``token_file``), or ``aws``:
    its own AWS identity (the standard credential chain; ``AWS_ENDPOINT_URL`` honoured),
    admitted by an allow rule (``fleetgate tokens add --type agent --method aws``)."""
    token_file: Path | None = None
    """The join token (``fleetgate tokens add --type agent``); read only when the agent
    has no valid certificate in data_dir yet."""
    ca_file: Path | None = None
    """The CA of the auth service's HTTPS certificate (the fleet's ``ca.crt``, as for
    ``fleetgate login --ca-file``)."""
    ca_fingerprint: str | None = None
    """Or that CA's fingerprint (``SHA256:...``, as ``auth init`` printed it): the CA is
    fetched once, checked and kept in data_dir (``auth-ca.pem``). With neither, the
    system's trusted roots (an auth service with a certificate from a public CA)."""

    @field_validator("auth")
    @classmethod
    def _auth(cls, addr: str) -> str:
        host, port = split_host_port(addr, default_port=3025)
        return join_host_port(host, port)

    @model_validator(mode="after")
    def _method(self) -> JoinConfig:
        if self.method == "aws" and self.token_file is not None:
            raise ValueError(
                "token_file is for method token; method aws joins with the agent's AWS "
                "identity (remove one of them)"
            )
        return self

    @field_validator("ca_file")
    @classmethod
    def _ca_file(cls, path: Path | None) -> Path | None:
        return _readable_pem(path)

    @field_validator("ca_fingerprint")
    @classmethod
    def _fingerprint(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"SHA256:[0-9a-fA-F]{64}", value.strip()):
            raise ValueError("expected SHA256: and 64 hex digits, as fleetgate auth init printed")
        return value.strip() if value is not None else None


class DbService(Strict):
    hostname: str = Field(default_factory=socket.gethostname)
    data_dir: Path = Path(DEFAULT_DATA_DIR)
    """Keeps the agent's host_id across restarts; one agent per directory."""
    listen_addr: HostPort = "0.0.0.0:6390"
    advertise_addr: str | None = None
    """Address clients reach this agent at; derived from listen_addr when unset."""
    listener: ListenerConfig | None = None
    """The client listener's TLS files; without it the agent only checks and announces."""
    resources: list[ResourceMatcher] = Field(default_factory=list)
    databases: list[StaticDatabase] = Field(default_factory=list)
    host_aliases: dict[str, str] = Field(default_factory=dict)
    """Dial another address for a database host: ``host`` or ``host:port`` ->
    ``host:port`` (or ``host``, keeping the port). For split-horizon DNS and tunnels."""
    upstream_ca_file: Path | None = None
    """A PEM bundle trusted for every database, besides the system roots."""
    health_check: HealthCheckConfig = HealthCheckConfig()
    heartbeat: HeartbeatConfig = HeartbeatConfig()
    managed_users: ManagedUsersConfig = ManagedUsersConfig()
    join: JoinConfig | None = None
    """Join the fleet with a one-time token and renew the certificate in data_dir; the
    listener then needs no ``cert_file``/``key_file``."""
    diag_addr: HostPort | None = None
    """``host:port`` of the diagnostics listener (``/metrics``, ``/healthz``, ``/readyz``;
    docs/operations.md); off when unset. Listener process K serves on port + K."""
    offline_grace: Duration = Field(default=900.0, ge=0)
    """How long after its last contact with the fleet's JetStream the agent still opens
    new sessions, checked against the last known CA, roles and registry; then it refuses
    them (saying why) until it reconnects. Open sessions are never cut for it."""

    @model_validator(mode="before")
    @classmethod
    def _joined_listener(cls, data: Any) -> Any:
        """With ``join`` and a listener without certificate files, the listener uses the
        agent's own (:data:`JOINED_IDENTITY_FILE` in data_dir)."""
        if not isinstance(data, dict) or not data.get("join"):
            return data
        listener = data.get("listener")
        if not isinstance(listener, dict) or "cert_file" in listener or "key_file" in listener:
            return data
        path = str(Path(data.get("data_dir") or DEFAULT_DATA_DIR) / JOINED_IDENTITY_FILE)
        listener = {**listener, "from_join": True, "cert_file": path, "key_file": path}
        return {**data, "listener": listener}

    @field_validator("hostname")
    @classmethod
    def _hostname(cls, name: str) -> str:
        if not name.strip():
            raise ValueError("hostname cannot be empty")
        return name.strip()

    @field_validator("advertise_addr")
    @classmethod
    def _advertise(cls, addr: str | None) -> str | None:
        if addr is None:
            return None
        host, port = split_host_port(addr)
        if host in ("0.0.0.0", "::"):
            raise ValueError(f"{addr!r}: advertise an address clients can reach, not {host}")
        return join_host_port(host, port)

    @field_validator("host_aliases")
    @classmethod
    def _aliases(cls, aliases: dict[str, str]) -> dict[str, str]:
        out: dict[str, str] = {}
        for source, target in aliases.items():
            try:
                _parse_alias_source(source)
            except ValueError as exc:
                raise ValueError(f"key {source!r}: {exc}") from None
            if not isinstance(target, str):
                raise ValueError(f"{source!r}: the target must be a string like 127.0.0.1:7000")
            try:
                split_host_port(target, default_port=0)
            except ValueError as exc:
                raise ValueError(f"{source!r}: target {exc}") from None
            out[source.lower()] = target
        return out

    @field_validator("upstream_ca_file")
    @classmethod
    def _ca(cls, path: Path | None) -> Path | None:
        return _readable_pem(path)

    @model_validator(mode="after")
    def _check(self) -> DbService:
        if not self.resources and not self.databases:
            raise ValueError(
                "nothing to serve: add resources (label matchers over the registry) "
                "or databases (static ones)"
            )
        seen: set[str] = set()
        for db in self.databases:
            if db.name in seen:
                raise ValueError(f"databases: {db.name!r} is listed twice")
            seen.add(db.name)
        return self

    def advertise(self) -> str:
        """The address announced in heartbeats."""
        if self.advertise_addr:
            return self.advertise_addr
        host, port = split_host_port(self.listen_addr)
        if host in ("0.0.0.0", "::", ""):
            host = outbound_ip() or self.hostname
        return join_host_port(host, port)


def _parse_alias_source(source: str) -> tuple[str, int | None]:
    if ":" in source and not source.startswith("[") and source.count(":") == 1:
        host, port = split_host_port(source)
        return host, port
    if source.startswith("["):
        host, port = split_host_port(source)
        return host, port
    return check_host(source, source), None


def outbound_ip() -> str | None:
    """The local address the kernel would use to reach other hosts (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("10.255.255.255", 1))
            address: str = sock.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("0.") else address


class AgentConfig(Strict):
    nats: NatsSettings = NatsSettings()
    jetstream: JetStreamSettings | None = None
    """Replicas and placement of the buckets and audit stream an agent creates."""
    db_service: DbService
