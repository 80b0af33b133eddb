"""The tunnel's pure parts: agent order and addresses."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from bus import TargetHealth
from bus.servers import HealthStatus
from client.connect import ConnectError, order_agents, split_addr
from client.people import AgentAddress


def agent(host_id: str, status: HealthStatus) -> AgentAddress:
    return AgentAddress(host_id, host_id, f"{host_id}:6390", TargetHealth(status=status))


def test_order_is_healthy_then_unknown_then_unhealthy() -> None:
    agents = [agent("u1", "unhealthy"), agent("k1", "unknown"), agent("h1", "healthy"),
              agent("k2", "unknown"), agent("h2", "healthy")]  # fmt: skip
    for seed in range(20):
        order = [a.host_id[0] for a in order_agents(agents, random.Random(seed))]
        assert order == ["h", "h", "k", "k", "u"]


def test_order_spreads_clients_within_a_tier() -> None:
    agents = [agent(f"h{i}", "healthy") for i in range(3)]
    firsts = Counter(order_agents(agents, random.Random(seed))[0].host_id for seed in range(300))
    assert set(firsts) == {"h0", "h1", "h2"} and min(firsts.values()) > 60


@pytest.mark.parametrize(
    ("addr", "expected"),
    [("10.0.0.7:6390", ("10.0.0.7", 6390)), ("agent-1.internal:6390", ("agent-1.internal", 6390)),
     ("[::1]:6390", ("::1", 6390))],
)  # fmt: skip
def test_split_addr(addr: str, expected: tuple[str, int]) -> None:
    assert split_addr(addr) == expected


@pytest.mark.parametrize("addr", ["10.0.0.7", ":6390", "host:port", ""])
def test_split_addr_refuses(addr: str) -> None:
    with pytest.raises(ConnectError, match="is not host:port"):
        split_addr(addr)
