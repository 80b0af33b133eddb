"""How the answers of several shards become the one answer a client expects (pure).

Every function takes the shards' whole replies (as sent) and returns the reply for the
client, encoded in the client's protocol; the first error reply of any shard wins.
"""

from __future__ import annotations

from collections.abc import Sequence

from dbservice.route import cluster_node_id

from .resp import OK, Error, Status, Value, decode, encode_value, error_of
from .topology import Address, Topology

SCAN_SHARD_BITS = 10
"""A SCAN cursor is ``shard cursor << 10 | shard index``: up to 1024 shards."""


def first_error(frames: Sequence[bytes]) -> bytes | None:
    for frame in frames:
        if error_of(frame) is not None:
            return frame
    return None


def all_ok(frames: Sequence[bytes]) -> bytes:
    return first_error(frames) or OK


def first(frames: Sequence[bytes]) -> bytes:
    return first_error(frames) or frames[0]


def total(frames: Sequence[bytes]) -> bytes:
    """Integers summed (DBSIZE, DEL, EXISTS, TOUCH, UNLINK)."""
    if (err := first_error(frames)) is not None:
        return err
    return b":%d\r\n" % sum(int(frame[1:-2]) for frame in frames)


def concat(frames: Sequence[bytes], resp3: bool) -> bytes:
    """Arrays joined (KEYS)."""
    if (err := first_error(frames)) is not None:
        return err
    out: list[Value] = []
    for frame in frames:
        value = decode(frame)
        if isinstance(value, list):
            out.extend(value)
    return encode_value(out, resp3)


def all_true(frames: Sequence[bytes], resp3: bool) -> bytes:
    """Arrays of 0/1 combined element-wise with AND (SCRIPT EXISTS)."""
    if (err := first_error(frames)) is not None:
        return err
    rows = [decode(frame) for frame in frames]
    lists = [row for row in rows if isinstance(row, list)]
    size = min((len(row) for row in lists), default=0)
    return encode_value([int(all(bool(row[i]) for row in lists)) for i in range(size)], resp3)


def random_key(frames: Sequence[bytes]) -> bytes:
    """The first shard's key that is not nil (the shards are asked in random order)."""
    if (err := first_error(frames)) is not None:
        return err
    for frame in frames:
        if decode(frame) is not None:
            return frame
    return frames[0]


def regroup(order: Sequence[tuple[int, int]], frames: Sequence[bytes], resp3: bool) -> bytes:
    """MGET split per slot: ``order[i]`` = (request, position in its reply) of key i."""
    if (err := first_error(frames)) is not None:
        return err
    values = [decode(frame) for frame in frames]
    out: list[Value] = []
    for request, position in order:
        reply = values[request]
        out.append(reply[position] if isinstance(reply, list) else None)
    return encode_value(out, resp3)


# -- SCAN ----------------------------------------------------------------------------------


def scan_cursor(cursor: bytes, shards: int) -> tuple[int, int] | None:
    """(shard index, shard cursor) of a client cursor; None when it is not one of ours."""
    try:
        value = int(cursor)
    except ValueError:
        return None
    if value < 0:
        return None
    index, position = value & ((1 << SCAN_SHARD_BITS) - 1), value >> SCAN_SHARD_BITS
    if index >= shards:
        return None
    return index, position


def scan_reply(frame: bytes, index: int, shards: int, resp3: bool) -> bytes:
    """A shard's SCAN reply with its cursor turned into ours: the next shard from its
    start once this one is done, 0 after the last."""
    value = decode(frame)
    if not isinstance(value, list) or len(value) != 2 or not isinstance(value[0], bytes):
        return frame
    position = int(value[0])
    if position == 0:
        cursor = 0 if index + 1 >= shards else index + 1
    else:
        cursor = position << SCAN_SHARD_BITS | index
    return encode_value([b"%d" % cursor, value[1]], resp3)


# -- INFO ----------------------------------------------------------------------------------


def info(frames: Sequence[bytes], shards: int) -> bytes:
    """The first primary's INFO with its Keyspace section summed over every primary and
    a ``cluster_shards`` line in the Cluster section. Per-node INFO: ``--node``."""
    if (err := first_error(frames)) is not None:
        return err
    texts = [_text(decode(frame)) for frame in frames]
    totals: dict[str, dict[str, int]] = {}
    for text in texts:
        for line in _section(text, "Keyspace"):
            db, _, fields = line.partition(":")
            entry = totals.setdefault(db, {})
            for pair in fields.split(","):
                key, _, number = pair.partition("=")
                if number.isdigit():
                    entry[key] = entry.get(key, 0) + int(number)
    lines, section = [], ""
    for line in texts[0].split("\r\n"):
        if line.startswith("# "):
            section = line[2:].strip()
        if section == "Keyspace" and line and not line.startswith("#"):
            continue
        lines.append(line)
        if line.strip() == "# Keyspace":
            for db, entry in sorted(totals.items()):
                lines.append(db + ":" + ",".join(f"{k}={v}" for k, v in entry.items()))
        if line.strip() == "# Cluster":
            lines.append(f"cluster_shards:{shards}")
    body = "\r\n".join(lines).encode()
    return b"$%d\r\n%s\r\n" % (len(body), body)


def _text(value: Value) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, Status):
        return value.text.decode("utf-8", "replace")
    return ""


def _section(text: str, name: str) -> list[str]:
    out, inside = [], False
    for line in text.splitlines():
        if line.startswith("# "):
            inside = line[2:].strip() == name
        elif inside and line.strip():
            out.append(line.strip())
    return out


# -- CLUSTER as one node -----------------------------------------------------------------------


def node_id(database: str) -> str:
    """The engine's node id as a client sees it: stable per database (the route
    protocol's :func:`~dbservice.route.cluster_node_id`)."""
    return cluster_node_id(database)


def _ranges(topology: Topology) -> list[tuple[int, int]]:
    spans = sorted(r for shard in topology.shards for r in shard.ranges)
    merged: list[tuple[int, int]] = []
    for first_slot, last_slot in spans:
        if merged and merged[-1][1] + 1 == first_slot:
            merged[-1] = (merged[-1][0], last_slot)
        else:
            merged.append((first_slot, last_slot))
    return merged


def cluster_slots(topology: Topology, address: Address, nid: str, resp3: bool) -> bytes:
    host = address[0].encode()
    rows: list[Value] = [[a, b, [host, address[1], nid.encode()]] for a, b in _ranges(topology)]
    return encode_value(rows, resp3)


def cluster_shards(topology: Topology, address: Address, nid: str, resp3: bool) -> bytes:
    slots: list[Value] = [bound for span in _ranges(topology) for bound in span]
    node: dict[bytes, Value] = {
        b"id": nid.encode(),
        b"port": address[1],
        b"ip": address[0].encode(),
        b"endpoint": address[0].encode(),
        b"role": b"master",
        b"replication-offset": 0,
        b"health": b"online",
    }
    shard: dict[bytes, Value] = {b"slots": slots, b"nodes": [node], b"id": nid.encode()}
    return encode_value([shard], resp3)


def cluster_nodes(topology: Topology, address: Address, nid: str) -> bytes:
    spans = " ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in _ranges(topology))
    line = f"{nid} {address[0]}:{address[1]}@0 myself,master - 0 0 1 connected {spans}\n"
    body = line.encode()
    return b"$%d\r\n%s\r\n" % (len(body), body)


def cluster_info(frame: bytes, topology: Topology) -> bytes:
    """A shard's CLUSTER INFO, its node and shard counts those of one node."""
    value = decode(frame)
    if isinstance(value, Error):
        return frame
    assigned = sum(b - a + 1 for a, b in _ranges(topology))
    replace = {
        "cluster_known_nodes": "1",
        "cluster_size": "1",
        "cluster_slots_assigned": str(assigned),
        "cluster_slots_ok": str(assigned),
        "cluster_slots_pfail": "0",
        "cluster_slots_fail": "0",
    }
    lines = []
    for line in _text(value).split("\r\n"):
        key, sep, _ = line.partition(":")
        lines.append(f"{key}:{replace[key]}" if sep and key in replace else line)
    body = "\r\n".join(lines).encode()
    return b"$%d\r\n%s\r\n" % (len(body), body)
