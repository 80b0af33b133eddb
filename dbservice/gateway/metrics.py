"""The agent's metrics (docs/operations.md lists them): one :class:`AgentMetrics` per
agent process, on its own registry, incremented at the listener's seams.

The command path counts nothing per command: a session's commands, refusals and bytes
are added when it ends (from the engine's own :class:`SessionStats`); what is a level
(sessions open, audit events held, databases served) is read when scraped."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

REFUSAL_REASONS = (
    "tls_handshake",
    "certificate",
    "route",
    "limit",
    "offline",
    "audit_full",
    "unknown_database",
    "access_denied",
    "roles_unavailable",
    "upstream",
    "own_certificate_expired",
)
"""The bounded ``reason`` label of ``fleetgate_agent_sessions_refused_total``."""

UPSTREAM_FAILURES = ("tls", "iam", "managed_password", "timeout", "connect", "other")
"""The ``kind`` label of ``fleetgate_agent_upstream_failures_total``."""

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_DURATION = (1.0, 10.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 12 * 3600.0, 86400.0)


class _Levels(Collector):
    """Gauges and counters read from the agent's own state when scraped."""

    def __init__(self, read: Callable[[], Iterable[Metric]]) -> None:
        self.read = read

    def collect(self) -> Iterator[Metric]:
        yield from self.read()

    def describe(self) -> Iterator[Metric]:
        return iter(())  # collected only when scraped: nothing read at registration


class AgentMetrics:
    """The agent's counters and histograms; :meth:`levels` adds those read when scraped."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.sessions_opened = Counter(
            "fleetgate_agent_sessions_opened",
            "Client sessions proxied to a database (past access checks and upstream login)",
            ["database"],
            registry=r,
        )
        self.sessions_refused = Counter(
            "fleetgate_agent_sessions_refused",
            "Client connections refused, by reason",
            ["reason"],
            registry=r,
        )
        for reason in REFUSAL_REASONS:
            self.sessions_refused.labels(reason)
        self.session_duration = Histogram(
            "fleetgate_agent_session_duration_seconds",
            "How long client sessions lasted (counted when they end)",
            buckets=_DURATION,
            registry=r,
        )
        self.commands_forwarded = Counter(
            "fleetgate_agent_commands_forwarded",
            "Client commands forwarded to the database (counted when the session ends)",
            ["database"],
            registry=r,
        )
        self.commands_refused = Counter(
            "fleetgate_agent_commands_refused",
            "Client commands the agent refused (counted when the session ends)",
            ["database"],
            registry=r,
        )
        self.bytes = Counter(
            "fleetgate_agent_bytes",
            "Bytes proxied, by direction (to_db, to_client; counted when the session ends)",
            ["direction"],
            registry=r,
        )
        self.upstream_connect = Histogram(
            "fleetgate_agent_upstream_connect_seconds",
            "Upstream dial, TLS and login of a session, when it succeeded",
            buckets=_LATENCY,
            registry=r,
        )
        self.upstream_failures = Counter(
            "fleetgate_agent_upstream_failures",
            "Upstream dials or logins that failed, by kind",
            ["kind"],
            registry=r,
        )
        for kind in UPSTREAM_FAILURES:
            self.upstream_failures.labels(kind)

    def levels(self, read: Callable[[], Iterable[Metric]]) -> None:
        """Register ``read``: metrics read from the agent's state at each scrape."""
        self.registry.register(_Levels(read))


def gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def labelled_gauge(
    name: str, documentation: str, label: str, values: Iterable[tuple[str, float]]
) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=[label])
    for key, value in values:
        family.add_metric([key], value)
    return family


def counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def labelled_counter(
    name: str, documentation: str, label: str, values: Iterable[tuple[str, float]]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=[label])
    for key, value in sorted(values):
        family.add_metric([key], value)
    return family
