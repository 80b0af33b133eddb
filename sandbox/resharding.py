"""Resharding for the stand-in: move one slot from its owner to another primary, the
way ``valkey-cli --cluster reshard`` does, while clients keep running:

1. ``CLUSTER SETSLOT <slot> IMPORTING <source>`` on the target, ``MIGRATING <target>``
   on the source (from now on the source answers ``ASK`` for keys it no longer has);
2. ``CLUSTER GETKEYSINSLOT`` and ``MIGRATE ... KEYS`` in batches (``between`` is awaited
   after each batch, so a test can interleave its own traffic);
3. ``CLUSTER SETSLOT <slot> NODE <target>`` on the target, the source, then every other
   primary (clients now get ``MOVED``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

from sandbox.valkeynode import COMMAND_TIMEOUT, RespError, ValkeyNode, command

Between = Callable[[], Awaitable[None]]


async def node_command(node: ValkeyNode, *args: str | int | bytes) -> object:
    """One command (binary-safe arguments) on a fresh plain connection to ``node``; a
    ``MIGRATE`` batch may take longer than a plain command."""
    return await command(node.host, node.port, *args, limit=COMMAND_TIMEOUT * 5)


async def node_ids(nodes: Sequence[ValkeyNode]) -> dict[str, ValkeyNode]:
    out = {}
    for node in nodes:
        if node.running:
            node_id = await node.command("CLUSTER", "MYID")
            assert isinstance(node_id, bytes)
            out[node_id.decode()] = node
    return out


async def slot_owner(nodes: Sequence[ValkeyNode], slot: int) -> str:
    """The node id owning ``slot``, as the first running node sees it."""
    node = next(n for n in nodes if n.running)
    reply = await node.command("CLUSTER", "NODES")
    assert isinstance(reply, bytes)
    for line in reply.decode().splitlines():
        fields = line.split()
        if len(fields) < 9 or "master" not in fields[2]:
            continue
        for part in fields[8:]:
            if part.startswith("["):
                continue
            first, _, last = part.partition("-")
            if int(first) <= slot <= int(last or first):
                return fields[0]
    raise RuntimeError(f"slot {slot} has no owner")


async def move_slot(
    nodes: Sequence[ValkeyNode],
    slot: int,
    target: ValkeyNode,
    *,
    batch: int = 100,
    between: Between | None = None,
) -> int:
    """Move ``slot`` to ``target`` (a primary); returns how many keys moved. Nothing to
    do when ``target`` already owns it."""
    ids = await node_ids(nodes)
    by_node = {id(node): node_id for node_id, node in ids.items()}
    target_id = by_node[id(target)]
    source_id = await slot_owner(nodes, slot)
    if source_id == target_id:
        return 0
    source = ids[source_id]
    await target.command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
    await source.command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
    moved = 0
    while True:
        keys = await source.command("CLUSTER", "GETKEYSINSLOT", slot, batch)
        assert isinstance(keys, list)
        if not keys:
            break
        await _migrate(source, target, [k for k in keys if isinstance(k, bytes)])
        moved += len(keys)
        if between is not None:
            await between()
    await target.command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
    await source.command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
    for node_id, node in ids.items():
        if node_id in (source_id, target_id):
            continue
        try:
            await node.command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        except RespError as exc:  # a replica: it learns from its primary
            if "master" not in str(exc).lower() and "primary" not in str(exc).lower():
                raise
    return moved


async def _migrate(source: ValkeyNode, target: ValkeyNode, keys: list[bytes]) -> None:
    while True:
        try:
            await node_command(
                source, "MIGRATE", target.host, target.port, "", 0, 5000, "KEYS", *keys
            )
            return
        except RespError as exc:  # a key busy in a script or a transaction: again
            if "BUSYKEY" in str(exc) or "IOERR" not in str(exc):
                raise
            await asyncio.sleep(0.01)
