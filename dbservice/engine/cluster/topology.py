"""Shards and who owns each slot, from ``CLUSTER SHARDS`` or ``CLUSTER SLOTS`` (pure).

Addresses are what the nodes announce (``endpoint``, else ``ip``; the TLS port when the
node announces one): for MemoryDB these are the nodes' own names, which the agent maps
through its host aliases like any other address.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .resp import Error, Status, Value
from .slots import SLOTS

Address = tuple[str, int]


@dataclass(frozen=True, slots=True)
class Node:
    id: str
    host: str
    port: int
    primary: bool
    healthy: bool = True

    @property
    def address(self) -> Address:
        return (self.host, self.port)


@dataclass(frozen=True, slots=True)
class Shard:
    id: str
    """The shard id (``CLUSTER SHARDS``), else the primary's node id."""
    primary: Node
    replicas: tuple[Node, ...]
    ranges: tuple[tuple[int, int], ...]

    @property
    def slots(self) -> int:
        return sum(last - first + 1 for first, last in self.ranges)


class TopologyError(Exception):
    """The cluster's answer about its shards cannot be used."""


class Topology:
    """The shards in a stable order (by their first slot, slotless ones last) and a
    slot -> shard index map (-1: the slot has no owner now)."""

    def __init__(self, shards: Sequence[Shard]) -> None:
        self.shards = tuple(
            sorted(shards, key=lambda s: (min((r[0] for r in s.ranges), default=SLOTS), s.id))
        )
        self.owner = [-1] * SLOTS
        for index, shard in enumerate(self.shards):
            for first, last in shard.ranges:
                for slot in range(first, last + 1):
                    self.owner[slot] = index
        self.addresses: list[Address | None] = [
            self.shards[i].primary.address if i >= 0 else None for i in self.owner
        ]
        """Slot -> its primary's address (the engine's per-command lookup)."""

    def shard_of_slot(self, slot: int) -> Shard | None:
        index = self.owner[slot]
        return self.shards[index] if index >= 0 else None

    @property
    def primaries(self) -> list[Node]:
        """Primaries of the shards that own slots (the ones whole-cluster commands ask)."""
        return [shard.primary for shard in self.shards if shard.ranges]

    @property
    def covered(self) -> bool:
        return -1 not in self.owner

    def find(self, name: str) -> Shard | None:
        """The shard named by its id, a node id (or a prefix of 8 characters or more),
        or a node's ``host:port``."""
        for shard in self.shards:
            nodes = (shard.primary, *shard.replicas)
            if name == shard.id or any(name == f"{n.host}:{n.port}" for n in nodes):
                return shard
            if len(name) >= 8 and any(n.id.startswith(name) for n in nodes):
                return shard
        return None

    def __repr__(self) -> str:
        parts = [
            f"{s.id[:8]}@{s.primary.host}:{s.primary.port}{list(s.ranges)}" for s in self.shards
        ]
        return f"Topology({', '.join(parts)})"


def _s(value: Value) -> str:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, Status):
        return value.text.decode()
    return str(value)


def _pairs(value: Value) -> dict[str, Value]:
    if isinstance(value, dict):
        return {_s(k): v for k, v in value.items()}
    if isinstance(value, list):
        return {_s(value[i]): value[i + 1] for i in range(0, len(value) - 1, 2)}
    return {}


def _host(fields: dict[str, Value]) -> str:
    endpoint = _s(fields.get("endpoint", b""))
    if endpoint and endpoint != "?":
        return endpoint
    return _s(fields.get("ip", b""))


def from_shards(reply: Value) -> Topology:
    """``CLUSTER SHARDS`` (RESP2 or RESP3)."""
    if isinstance(reply, Error) or not isinstance(reply, list):
        raise TopologyError(f"CLUSTER SHARDS answered {reply!r}")
    shards = []
    for entry in reply:
        fields = _pairs(entry)
        raw_slots = fields.get("slots") or []
        if not isinstance(raw_slots, list):
            raise TopologyError("CLUSTER SHARDS: slots is not a list")
        bounds = [int(v) if isinstance(v, int | bytes) else 0 for v in raw_slots]
        ranges = tuple(zip(bounds[::2], bounds[1::2], strict=True))
        primary, replicas = None, []
        nodes_value = fields.get("nodes") or []
        for raw in nodes_value if isinstance(nodes_value, list) else []:
            node_fields = _pairs(raw)
            port = node_fields.get("tls-port") or node_fields.get("port")
            node = Node(
                id=_s(node_fields.get("id", b"")),
                host=_host(node_fields),
                port=int(port) if isinstance(port, int | bytes) else 0,
                primary=_s(node_fields.get("role", b"")) in ("master", "primary"),
                healthy=_s(node_fields.get("health", b"online")) == "online",
            )
            if node.primary and primary is None:
                primary = node
            else:
                replicas.append(node)
        if primary is None:
            if ranges:
                raise TopologyError("CLUSTER SHARDS: a shard with slots has no primary")
            continue
        shard_id = _s(fields["id"]) if "id" in fields else primary.id
        shards.append(Shard(shard_id, primary, tuple(replicas), ranges))
    if not shards:
        raise TopologyError("CLUSTER SHARDS listed no shard")
    return Topology(shards)


def from_slots(reply: Value) -> Topology:
    """``CLUSTER SLOTS`` (engines before CLUSTER SHARDS): shards are the primaries."""
    if isinstance(reply, Error) or not isinstance(reply, list):
        raise TopologyError(f"CLUSTER SLOTS answered {reply!r}")
    ranges: dict[str, list[tuple[int, int]]] = {}
    nodes: dict[str, tuple[Node, list[Node]]] = {}
    for entry in reply:
        if not isinstance(entry, list) or len(entry) < 3:
            raise TopologyError("CLUSTER SLOTS: malformed entry")
        first, last = entry[0], entry[1]
        if not isinstance(first, int) or not isinstance(last, int):
            raise TopologyError("CLUSTER SLOTS: malformed slot range")
        described = [_slot_node(n, primary=i == 0) for i, n in enumerate(entry[2:])]
        primary = described[0]
        ranges.setdefault(primary.id, []).append((first, last))
        nodes.setdefault(primary.id, (primary, described[1:]))
    return Topology(
        [
            Shard(node_id, primary, tuple(replicas), tuple(sorted(ranges[node_id])))
            for node_id, (primary, replicas) in nodes.items()
        ]
    )


def _slot_node(value: Value, *, primary: bool) -> Node:
    if not isinstance(value, list) or len(value) < 2:
        raise TopologyError("CLUSTER SLOTS: malformed node")
    host, port = _s(value[0]), value[1]
    node_id = _s(value[2]) if len(value) > 2 else f"{host}:{_s(port)}"
    return Node(
        id=node_id, host=host, port=int(port) if isinstance(port, int) else 0, primary=primary
    )
