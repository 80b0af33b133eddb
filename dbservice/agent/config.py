"""The agent's config file, validated with errors that name the field."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import socket
import ssl
import sys
from pathlib import Path
from typing import Literal

from cryptography import x509
from pydantic import BaseModel, ByteSize, ConfigDict, Field, field_validator, model_validator

from bus.labels import check_selector, is_valid_label_key
from fleetgate.config import check_external_id, check_role_arn
from fleetgate.durations import Duration

_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,126}[a-z0-9])?$")
_HOST = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_.-]{0,252})$")

DEFAULT_DATA_DIR = "/var/lib/fleetgate/agent"
DEFAULT_PORT = 6379


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def split_host_port(text: str, *, default_port: int | None = None) -> tuple[str, int]:
    """``"h:6379"``, ``"[::1]:6379"`` (or ``"h"`` with a default port) -> (host, port);
    ValueError with an example otherwise."""
    text = text.strip()
    host, port_text = text, ""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"{text!r}: missing ']' after an IPv6 address")
        host, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError(f"{text!r} is not host:port (example: [::1]:6379)")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif text.count(":") > 1:
        raise ValueError(f"{text!r}: write IPv6 addresses in brackets, like [::1]:6379")
    if not port_text:
        if default_port is None:
            raise ValueError(f"{text!r} has no port (example: 10.0.1.5:6379)")
        return _check_host(host, text), default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{text!r}: the port must be a number from 1 to 65535")
    return _check_host(host, text), int(port_text)


def _check_host(host: str, text: str) -> str:
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    if not _HOST.match(host):
        raise ValueError(f"{text!r}: {host!r} is not a host name or IP address")
    return host


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class NatsSettings(Strict):
    url: str | None = None
    """NATS URL; ``--nats`` and ``FLEETGATE_NATS_URL`` take precedence."""
    start_wait: Duration = 30.0
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


MAX_QUERY_RECORD = 96 * 1024
"""Largest audit record of one command the config allows, in argument bytes: JSON
escaping of binary arguments can grow it sixfold, and a batch of up to 256 KiB plus one
such record must still fit in NATS's default 1 MiB message."""


class QueryAuditConfig(Strict):
    """How much of each command goes into ``db.session.query`` events (secrets are
    always masked)."""

    redact_values: bool = False
    """Keep only each command's first argument (usually the key); replace the others by
    their size."""
    max_arg_len: int = Field(default=256, ge=1)
    """Longer arguments are cut."""
    max_args: int = Field(default=64, ge=0)
    """Further arguments are replaced by their count."""

    @model_validator(mode="after")
    def _fits_a_message(self) -> QueryAuditConfig:
        # One command's record must fit in one NATS message, or it could never be stored.
        if self.max_args * self.max_arg_len > MAX_QUERY_RECORD:
            raise ValueError(
                f"max_args x max_arg_len is {self.max_args * self.max_arg_len} bytes; "
                f"one command's audit record must stay under {MAX_QUERY_RECORD} bytes "
                "(so that it fits in one NATS message even escaped): lower one of them"
            )
        return self


class ListenerConfig(Strict):
    """Where clients connect: mutual TLS with a certificate from the fleet CA (read from
    the registry), then the route preamble. Without it the agent accepts no clients."""

    cert_file: Path
    """The agent's server certificate (``fleetgate auth sign --host NAME --out DIR``
    writes ``DIR/cert.pem``); it must name the host of ``advertise_addr``."""
    key_file: Path
    """Its private key (``DIR/key.pem``)."""
    handshake_timeout: Duration = 10.0
    """Limit for a new connection to show who it is and where it goes: the TLS handshake
    and the route (in the server name, or the preamble) together, from the accept; a
    connection not there by then is closed. The role check gets this limit again."""
    max_handshakes: int = Field(default=1024, ge=1)
    """Connections still in their handshake (not yet authenticated: TLS and route) at
    once, counted apart from ``max_connections``. When full, the oldest of them is closed
    to make room for a new one, so connections that send nothing cannot keep clients
    out: a real client finishes its handshake in milliseconds."""
    max_handshakes_per_address: int = Field(default=64, ge=1)
    """Of those, from one client address (an IPv4 address, an IPv6 /64); more from that
    address are closed at once, without TLS."""
    connect_timeout: Duration = 10.0
    """Limit for reaching the database: TCP connect and TLS handshake."""
    max_connections: int = Field(default=10_000, ge=1)
    """Sessions open at once, counted from the end of the handshake (connections still in
    it count toward ``max_handshakes``); more are refused with an error naming this
    limit (logged once per interval)."""
    idle_timeout: Duration | None = None
    """Close a session after this long without a byte either way (default: never)."""
    max_command_buffer: ByteSize = Field(default=ByteSize(128 * 1024 * 1024), ge=1024 * 1024)
    """Most bytes one session holds of a command still arriving (``128MiB``, ``1GiB``...).
    The cluster engine holds each command whole (to route it, and to send it again on a
    redirect), so a longer one is refused with an error naming this field, as soon as
    its lengths show it, and the session closed. The single-node engine (also ``db
    connect --node``) streams arguments to the server and holds at most 64 KiB plus one
    read of any command, so there only the server's ``proto-max-bulk-len`` applies."""
    max_command_buffer_total: ByteSize = Field(default=ByteSize(512 * 1024 * 1024), ge=1024 * 1024)
    """Most bytes all sessions together hold of commands still arriving; when over, a
    session holding more than 1 MiB of one is refused (error naming this field) as it
    reads more. Size it to a fraction of the agent's memory (about a quarter): the
    moment a held command is complete it briefly costs about twice its size."""
    iam_reauth: Duration = 11 * 3600.0
    """A session logged in to MemoryDB by IAM token sends a fresh ``AUTH`` this long
    after the last one (MemoryDB closes IAM connections 12 hours after their AUTH)."""
    audit: QueryAuditConfig = QueryAuditConfig()
    processes: int = 1
    """Processes accepting clients on ``listen_addr`` (Linux, SO_REUSEPORT): this agent
    and ``processes - 1`` listener processes it starts; ``auto`` is one per CPU."""

    @field_validator("processes", mode="before")
    @classmethod
    def _processes(cls, value: object) -> int:
        return check_processes(value)

    @model_validator(mode="after")
    def _buffers(self) -> ListenerConfig:
        if self.max_command_buffer > self.max_command_buffer_total:
            raise ValueError(
                "max_command_buffer cannot be more than max_command_buffer_total "
                f"({self.max_command_buffer} > {self.max_command_buffer_total} bytes)"
            )
        return self

    @field_validator("iam_reauth")
    @classmethod
    def _reauth(cls, every: float) -> float:
        if not 1 <= every < 12 * 3600:
            raise ValueError(
                "must be from 1s to under 12h (MemoryDB closes IAM connections 12 hours "
                "after their AUTH); the default is 11h"
            )
        return every

    @field_validator("cert_file")
    @classmethod
    def _cert(cls, path: Path) -> Path:
        text = _read_text(path)
        if "-----BEGIN CERTIFICATE-----" not in text:
            raise ValueError(f"{path} holds no PEM certificate")
        return path

    @field_validator("key_file")
    @classmethod
    def _key(cls, path: Path) -> Path:
        if "PRIVATE KEY-----" not in _read_text(path):
            raise ValueError(f"{path} holds no PEM private key")
        return path

    @model_validator(mode="after")
    def _pair(self) -> ListenerConfig:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(str(self.cert_file), str(self.key_file))
        except ssl.SSLError:
            raise ValueError(
                f"{self.key_file} is not the key of {self.cert_file}: use the key.pem and "
                "cert.pem that fleetgate auth sign --host wrote together"
            ) from None
        cert = x509.load_pem_x509_certificate(self.cert_file.read_bytes())
        expired = cert.not_valid_after_utc
        if expired < dt.datetime.now(dt.UTC):
            raise ValueError(
                f"{self.cert_file} expired at {expired:%Y-%m-%d %H:%M:%SZ}: issue a new one "
                "with fleetgate auth sign --host NAME --out DIR"
            )
        return self


MAX_PROCESSES = 64


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity: a container's cpuset), else all."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def check_processes(value: object, *, platform: str = sys.platform) -> int:
    """``listener.processes``: a whole number from 1 to 64, or ``auto`` (one per CPU
    this process may run on, at most 64; 1 where SO_REUSEPORT does not spread
    connections)."""
    if value == "auto":
        if not platform.startswith("linux"):
            return 1
        return max(1, min(usable_cpus(), MAX_PROCESSES))
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(
            f"{value!r}: give a whole number from 1 to {MAX_PROCESSES}, or auto (one per CPU)"
        )
    if not 1 <= value <= MAX_PROCESSES:
        raise ValueError(
            f"{value}: give a whole number from 1 to {MAX_PROCESSES}, or auto (one per CPU)"
        )
    if value > 1 and not platform.startswith("linux"):
        raise ValueError(
            f"{value}: several listener processes need Linux (the kernel spreads connections "
            f"over sockets sharing a port with SO_REUSEPORT); this is {platform}: use 1"
        )
    return value


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a PEM file") from None


class DbService(Strict):
    hostname: str = Field(default_factory=socket.gethostname)
    data_dir: Path = Path(DEFAULT_DATA_DIR)
    """Keeps the agent's host_id across restarts; one agent per directory."""
    listen_addr: str = "0.0.0.0:6390"
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

    @field_validator("hostname")
    @classmethod
    def _hostname(cls, name: str) -> str:
        if not name.strip():
            raise ValueError("hostname cannot be empty")
        return name.strip()

    @field_validator("listen_addr")
    @classmethod
    def _listen(cls, addr: str) -> str:
        host, port = split_host_port(addr)
        return join_host_port(host, port)

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
    return _check_host(source, source), None


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
    db_service: DbService
