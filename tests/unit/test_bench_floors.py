"""Issue 18's floors as benchmarks/proxy.py judges them, on figures made up here."""

from __future__ import annotations

from benchmarks.proxy import floor_verdicts


def _rps(node: float, cluster: float, peer: float) -> dict[tuple[str, str, int], float]:
    out = {}
    for op in ("SET", "GET"):
        for pipeline, scale in ((1, 1.0), (16, 10.0)):
            out[("agent", op, pipeline)] = node * scale
            out[("agent cluster", op, pipeline)] = cluster * scale
            out[("haproxy TLS", op, pipeline)] = peer * scale
    return out


def test_every_floor_is_judged_with_its_own_bound() -> None:
    cpu = {("agent", "SET", 16): 2.5, ("agent", "GET", 16): 2.6}
    cpu |= {("agent cluster", "SET", 16): 3.0, ("agent cluster", "GET", 16): 3.1}
    verdicts = floor_verdicts(
        _rps(node=100.0, cluster=90.0, peer=125.0),
        cpu,
        {"direct TLS": 0.10, "agent": 0.25, "agent cluster": 0.26},
        {"agent": 40.0, "agent cluster": 60.0},
    )
    met = {what: ok for what, _, ok in verdicts}
    assert len(met) == 4 + 4 + 4 + 2 + 1
    # 0.9x the node engine: met exactly at the floor
    assert all(met[f"cluster/node {op} P{p}"] for op in ("SET", "GET") for p in (1, 16))
    # against haproxy: 0.8x at pipeline 1 (met), 0.6x at 16 (0.8x: met)
    assert all(met[f"agent/haproxy TLS {op} P{p}"] for op in ("SET", "GET") for p in (1, 16))
    assert met["agent CPU/req SET P16"] and not met["agent CPU/req GET P16"]
    assert met["agent cluster CPU/req SET P16"] and not met["agent cluster CPU/req GET P16"]
    assert met["agent added p50"] and not met["agent cluster added p50"]
    assert met["idle session cluster/node"]


def test_below_the_floors_is_missed() -> None:
    verdicts = floor_verdicts(
        _rps(node=100.0, cluster=89.0, peer=126.0),
        {},
        {"direct TLS": 0.1, "agent": 0.2},
        {"agent": 40.0, "agent cluster": 61.0},
    )
    met = {what: ok for what, _, ok in verdicts}
    assert not any(met[f"cluster/node {op} P{p}"] for op in ("SET", "GET") for p in (1, 16))
    assert not met["agent/haproxy TLS SET P1"]  # 100 / 126 < 0.8
    assert met["agent/haproxy TLS SET P16"]  # 0.79x >= 0.6x
    assert not met["idle session cluster/node"]
    assert "agent cluster added p50" not in met  # not measured: not judged
