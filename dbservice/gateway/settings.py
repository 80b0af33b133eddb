"""The listener's section of the agent config (``db_service.listener``): where clients
connect, the limits on handshakes, sessions and held commands, and what the audit keeps
of each command. The agent's config (:mod:`dbservice.agent.config`) composes it."""

from __future__ import annotations

import datetime as dt
import os
import ssl
import sys
from pathlib import Path

from cryptography import x509
from pydantic import ByteSize, Field, ValidationInfo, field_validator, model_validator

from fleetgate.config import Strict
from fleetgate.durations import Duration

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
    spool_max_bytes: ByteSize = Field(default=ByteSize(1024 * 1024 * 1024), ge=1024 * 1024)
    """Audit events kept in ``<data_dir>/audit-spool`` while NATS cannot take them, at
    most (bytes of encoded events; ``1GiB``, ``500MB``). At this size new sessions and
    commands are refused, never run unaudited."""

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

    from_join: bool = False
    """Set by the agent when ``db_service.join`` is configured and no ``cert_file`` is
    given: the files are the agent's own in its data_dir (written at join and renewal),
    checked when they are written rather than here."""
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
    shard_idle_timeout: Duration | None = 30.0
    """Cluster engine: close a session's connection to a node (each shard's, and the
    configuration endpoint's it started with) after this long unused (nothing sent there,
    nothing owed), within a quarter more; the session's next command for that node opens
    and logs in a new one. A session's connections are kept while it is in
    ``WATCH``/``MULTI`` or after ``CLIENT NO-EVICT``/``NO-TOUCH``. An idle session then
    holds no connection to the cluster (``null``: keep them until the session ends)."""
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

    @field_validator("shard_idle_timeout")
    @classmethod
    def _shard_idle(cls, seconds: float | None) -> float | None:
        if seconds is not None and seconds < 1:
            raise ValueError(
                "must be 1s or more (each session checks its connections every quarter of "
                "it), or null to keep them until the session ends; the default is 30s"
            )
        return seconds

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
    def _cert(cls, path: Path, info: ValidationInfo) -> Path:
        if info.data.get("from_join"):
            return path
        text = read_text(path)
        if "-----BEGIN CERTIFICATE-----" not in text:
            raise ValueError(f"{path} holds no PEM certificate")
        return path

    @field_validator("key_file")
    @classmethod
    def _key(cls, path: Path, info: ValidationInfo) -> Path:
        if info.data.get("from_join"):
            return path
        if "PRIVATE KEY-----" not in read_text(path):
            raise ValueError(f"{path} holds no PEM private key")
        return path

    @model_validator(mode="after")
    def _pair(self) -> ListenerConfig:
        if self.from_join:
            return self
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


def read_text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a PEM file") from None
