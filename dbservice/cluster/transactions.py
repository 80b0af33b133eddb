"""``MULTI`` ... ``EXEC`` and ``WATCH`` over a cluster: one shard per transaction.

The engine queues the commands itself (``QUEUED``) and sends ``MULTI``, the commands
and ``EXEC`` together at ``EXEC`` to the shard of the transaction's slot (or to the
connection that ran ``WATCH``). A key in another slot is refused at once with
``CROSSSLOT`` and ``EXEC`` then answers ``EXECABORT``. A transaction that meets
``MOVED`` while queuing (nothing ran) is sent again where the slot is now.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

from .entries import Entry, Forward, Local, retrieve
from .link import LinkError
from .redirects import BACKOFF, MAX_REDIRECTS
from .resp import OK, encode_command, error
from .slots import key_slot

if TYPE_CHECKING:
    from .session import ClusterSession

_MULTI: Final = encode_command([b"MULTI"])
_EXEC: Final = encode_command([b"EXEC"])
_UNWATCH: Final = encode_command([b"UNWATCH"])
_QUEUED: Final = b"+QUEUED\r\n"
_EXECABORT: Final = b"-EXECABORT Transaction discarded because of previous errors.\r\n"
_WHY_TX = "every key of the transaction must map to one slot; use a {hash tag}"
_NOT_IN_TRANSACTION = frozenset(
    {"DBSIZE", "KEYS", "SCAN", "RANDOMKEY", "FLUSHALL", "FLUSHDB", "SCRIPT", "FUNCTION", "INFO",
     "CLUSTER", "CLIENT", "SELECT", "WAIT", "SUBSCRIBE", "PSUBSCRIBE", "SSUBSCRIBE",
     "UNSUBSCRIBE", "PUNSUBSCRIBE", "SUNSUBSCRIBE", "RESET", "MONITOR"}
)  # fmt: skip


class Transaction(Entry):
    """MULTI, the queued commands and EXEC, sent together to one shard at EXEC."""

    __slots__ = ("commands", "futures", "slot")

    def __init__(self, commands: list[Sequence[bytes]], slot: int | None) -> None:
        super().__init__("EXEC")
        self.commands = commands
        self.slot = slot
        self.futures: list[asyncio.Future[bytes]] = []

    async def resolve(self, session: ClusterSession) -> bytes:
        return await run(session, self)


def queue(session: ClusterSession, name: str, args: list[bytes]) -> Entry:
    """A command between MULTI and EXEC: checked and queued here, sent at EXEC."""
    assert session._multi is not None and session._table is not None
    if name in _NOT_IN_TRANSACTION:
        session._multi_failed = True
        return Local(
            name, error(f"ERR {name} cannot run in a transaction through fleetgate: {_WHY_TX}")
        )
    slots = {key_slot(args[p]) for p in session._table.key_positions(args)}
    if session._multi_slot is not None:
        slots.add(session._multi_slot)
    if len(slots) > 1:
        session._multi_failed = True
        return Local(
            name,
            error(
                "CROSSSLOT Keys in request don't hash to the same slot (a transaction "
                f"through fleetgate runs on one shard: {_WHY_TX})"
            ),
        )
    if slots:
        session._multi_slot = slots.pop()
    session._multi.append(args)
    return Local(name, _QUEUED)


def multi(session: ClusterSession, name: str, args: list[bytes]) -> Entry:
    if session._multi is not None:
        return Local(name, error("ERR MULTI calls can not be nested"))
    if len(args) != 1:
        return Local(name, error("ERR wrong number of arguments for 'multi' command"))
    session._multi, session._multi_failed = [], False
    session._multi_slot = session._watch_slot
    return Local(name, OK)


def exec_(session: ClusterSession, name: str, args: list[bytes]) -> Entry:
    if session._multi is None:
        return Local(name, error("ERR EXEC without MULTI"))
    commands, failed, slot = session._multi, session._multi_failed, session._multi_slot
    session._multi, session._multi_failed, session._multi_slot = None, False, None
    if failed:
        unwatch(session)
        return Local(name, _EXECABORT)
    return Transaction(commands, slot)


def discard(session: ClusterSession, name: str, args: list[bytes]) -> Entry:
    if session._multi is None:
        return Local(name, error("ERR DISCARD without MULTI"))
    session._multi, session._multi_failed, session._multi_slot = None, False, None
    unwatch(session)
    return Local(name, OK)


def watch(session: ClusterSession, name: str, args: list[bytes]) -> Entry:
    assert session._table is not None
    if session._multi is not None:
        return Local(name, error("ERR WATCH inside MULTI is not allowed"))
    slots = {key_slot(args[p]) for p in session._table.key_positions(args)}
    if session._watch_slot is not None:
        slots.add(session._watch_slot)
    if len(slots) > 1:
        return Local(
            name,
            error(
                "CROSSSLOT Keys in request don't hash to the same slot (watched keys "
                f"through fleetgate must share one slot: {_WHY_TX})"
            ),
        )
    if not slots:
        return Forward(name, session._request(args, None))
    slot = slots.pop()
    request = session._request(args, slot)
    session._watch, session._watch_slot = request.address, slot
    return Forward(name, request)


def unwatch(session: ClusterSession) -> None:
    """Forget the watched keys (and tell the connection that watched them)."""
    if session._watch is not None:
        for future in session.link(session._watch).send(_UNWATCH):
            future.add_done_callback(retrieve)
    session._watch = session._watch_slot = None


def unwatch_command(session: ClusterSession, name: str, args: list[bytes]) -> Entry:
    unwatch(session)
    return Local(name, OK)


async def run(session: ClusterSession, tx: Transaction) -> bytes:
    """Send the transaction (the writer's turn) and answer EXEC's reply."""
    for attempt in range(MAX_REDIRECTS + 1):
        address = session._watch or (
            session._owner(tx.slot) if tx.slot is not None else session._home()
        )
        link = session.link(address)
        payload = _MULTI + b"".join(encode_command(c) for c in tx.commands) + _EXEC
        try:
            futures = link.send(payload, len(tx.commands) + 2)
            frames = [await future for future in futures]
        except LinkError as exc:
            return error(f"ERR fleetgate: {exc}")
        queued = frames[1:-1]
        redirect = next(
            (f for f in queued if f.startswith((b"-MOVED", b"-ASK", b"-TRYAGAIN"))), None
        )
        if redirect is None or session._watch is not None or attempt == MAX_REDIRECTS:
            session._watch = session._watch_slot = None
            return frames[-1]
        session._hold()  # nothing ran (EXECABORT): send it where the slot is now
        await asyncio.sleep(BACKOFF[min(attempt, len(BACKOFF) - 1)])
        await session._refresh_quietly()
    return _EXECABORT
