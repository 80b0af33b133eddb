"""How to dial a database: its address after host aliases (split-horizon DNS, tunnels),
and the TLS context its settings ask for, shared between databases. Used by the health
checks and by every session the gateway opens."""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from bus.schemas import DatabaseResource
from dbservice.upstream.tls import upstream_context
from fleetgate.addresses import join_host_port, split_host_port


@dataclass(frozen=True)
class Target:
    """Where and how to dial one database."""

    host: str
    port: int
    tls: ssl.SSLContext | None
    server_name: str | None
    """SNI and the name verified (verify-full); the database's own host, not an alias."""

    @property
    def address(self) -> str:
        return join_host_port(self.host, self.port)

    @property
    def protocol(self) -> str:
        return "TCP+TLS+RESP" if self.tls else "TCP+RESP"


def resolve_alias(host: str, port: int, aliases: Mapping[str, str]) -> tuple[str, int]:
    """``host:port`` first, then ``host``; an alias without a port keeps ``port``."""
    target = aliases.get(join_host_port(host, port).lower()) or aliases.get(host.lower())
    if target is None:
        return host, port
    new_host, new_port = split_host_port(target, default_port=0)
    return new_host, new_port or port


@dataclass
class TLSContexts:
    """SSL contexts built once per distinct (mode, CA) and shared: each one holds the
    whole system trust store, so a thousand databases must not mean a thousand copies.
    Built by :func:`dbservice.upstream.tls.upstream_context` (system roots, Amazon's
    root CAs, ``extra_ca_file``, the database's CA)."""

    extra_ca_file: Path | None = None
    _cache: dict[tuple[str, str | None], ssl.SSLContext] = field(default_factory=dict)

    def get(self, mode: str, ca_pem: str | None) -> ssl.SSLContext | None:
        if mode == "disabled":
            return None
        key = (mode, ca_pem)
        context = self._cache.get(key)
        if context is None:
            context = self._build(mode, ca_pem)
            self._cache[key] = context
        return context

    def _build(self, mode: str, ca_pem: str | None) -> ssl.SSLContext:
        context = upstream_context(mode, ca_pem=ca_pem, ca_file=self.extra_ca_file)
        assert context is not None  # "disabled" never gets here
        return context


def build_target(
    resource: DatabaseResource, *, aliases: Mapping[str, str], contexts: TLSContexts
) -> Target:
    """How to dial ``resource`` (raises ValueError for a URI that is not host:port)."""
    host, port = split_host_port(resource.spec.uri, default_port=6379)
    dial_host, dial_port = resolve_alias(host, port, aliases)
    tls = resource.spec.tls
    memorydb = resource.spec.aws.memorydb if resource.spec.aws else None
    mode = "disabled" if memorydb is not None and not memorydb.tls_enabled else tls.mode
    return Target(
        host=dial_host,
        port=dial_port,
        tls=contexts.get(mode, tls.ca_cert),
        server_name=tls.server_name or host,
    )
