"""Discovery's metrics (docs/operations.md lists them): one :class:`DiscoveryMetrics`
per discovery process, on its own registry. The ``fetcher`` label is a fetcher's status
key (``memorydb.<region>.<matcher digest>``: bounded by the config); AWS calls are read from
:attr:`AwsSession.outcomes` when scraped."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

_POLL = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class _AwsCalls(Collector):
    def __init__(self, read: Callable[[], dict[tuple[str, str], int]]) -> None:
        self.read = read

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "fleetgate_discovery_aws_calls",
            "AWS API calls (pages count one each) by operation and outcome "
            "(ok, throttled, forbidden, failed)",
            labels=["operation", "outcome"],
        )
        for (operation, outcome), count in sorted(self.read().items()):
            family.add_metric([operation, outcome], count)
        yield family

    def describe(self) -> Iterator[Metric]:
        return iter(())


class DiscoveryMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.polls = Counter(
            "fleetgate_discovery_polls",
            "Fetcher polls by outcome (ok, partial, failed)",
            ["fetcher", "outcome"],
            registry=r,
        )
        self.poll_duration = Histogram(
            "fleetgate_discovery_poll_duration_seconds",
            "How long one fetcher's poll took",
            ["fetcher"],
            buckets=_POLL,
            registry=r,
        )
        self.last_success = Gauge(
            "fleetgate_discovery_last_success_timestamp_seconds",
            "When the fetcher last polled successfully (Unix time)",
            ["fetcher"],
            registry=r,
        )
        self.resources = Counter(
            "fleetgate_discovery_resources",
            "Registry entries written, deleted, or carried over unchanged because part of "
            "what describes them could not be read",
            ["action"],
            registry=r,
        )
        for action in ("written", "deleted", "carried"):
            self.resources.labels(action)

    def aws_calls(self, read: Callable[[], dict[tuple[str, str], int]]) -> None:
        """Export AWS calls as ``read`` returns them at each scrape."""
        self.registry.register(_AwsCalls(read))
