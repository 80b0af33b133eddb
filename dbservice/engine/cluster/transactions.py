"""``MULTI`` ... ``EXEC`` and ``WATCH`` over a cluster: one shard per transaction.

The engine queues the commands itself (``QUEUED``) and sends ``MULTI``, the commands
and ``EXEC`` together at ``EXEC`` to the shard of the transaction's slot (or to the
connection that ran ``WATCH``). A key in another slot is refused at once with
``CROSSSLOT`` and ``EXEC`` then answers ``EXECABORT``. A transaction a node refuses
because of where its slot is (``MOVED``/``ASK``/``TRYAGAIN``/``CLUSTERDOWN``, at queue
time or at ``EXEC``: nothing ran) is sent again where the slot is now (:func:`run`).

A command the engine answers with an error inside ``MULTI`` (a hook refusal, an arity
error, a command the engine cannot run in a transaction) marks the transaction failed,
as the server marks one for a command it rejects: ``EXEC`` then answers the server's
``EXECABORT`` and nothing of it runs (:func:`refused`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

from .entries import Entry, Forward, Local, retrieve
from .link import LinkError
from .redirects import BACKOFF, MAX_REDIRECTS, parse_address
from .resp import LARGE_ARGUMENT, OK, Payload, encode_command, encode_payload, error, prefixed
from .slots import key_slot
from .topology import Address

if TYPE_CHECKING:
    from .session import ClusterSession

_MULTI: Final = encode_command([b"MULTI"])
_EXEC: Final = encode_command([b"EXEC"])
_UNWATCH: Final = encode_command([b"UNWATCH"])
_ASKING: Final = encode_command([b"ASKING"])
_NULL2: Final = b"*-1\r\n"
_NULL3: Final = b"_\r\n"
_REDIRECTS: Final = (b"-MOVED ", b"-ASK ", b"-TRYAGAIN", b"-CLUSTERDOWN")
_QUEUED: Final = b"+QUEUED\r\n"
_EXECABORT: Final = b"-EXECABORT Transaction discarded because of previous errors.\r\n"
_EXECABORT_BECAUSE: Final = b"-EXECABORT Transaction discarded because of: "
_WHY_TX = "every key of the transaction must map to one slot; use a {hash tag}"
_NOT_IN_TRANSACTION = frozenset(
    {"DBSIZE", "KEYS", "SCAN", "RANDOMKEY", "FLUSHALL", "FLUSHDB", "SCRIPT", "FUNCTION", "INFO",
     "CLUSTER", "CLIENT", "SELECT", "WAIT", "SUBSCRIBE", "PSUBSCRIBE", "SSUBSCRIBE",
     "UNSUBSCRIBE", "PUNSUBSCRIBE", "SUNSUBSCRIBE", "RESET", "MONITOR"}
)  # fmt: skip


class TransactionState:
    """A session's ``MULTI`` and ``WATCH``: the commands queued since ``MULTI``, the slot
    they share, whether one was refused (``EXEC`` then aborts), and the node whose
    connection ran ``WATCH`` (the transaction must run there)."""

    __slots__ = ("failed", "queued", "slot", "watch_slot", "watched")

    def __init__(self) -> None:
        self.queued: list[Sequence[bytes]] | None = None
        """The commands queued since ``MULTI``; None outside ``MULTI``."""
        self.slot: int | None = None
        self.failed = False
        self.watched: Address | None = None
        self.watch_slot: int | None = None

    def begin(self) -> None:
        """``MULTI``: the transaction runs in the watched keys' slot, if any."""
        self.queued, self.failed, self.slot = [], False, self.watch_slot

    def fail(self) -> None:
        """Inside ``MULTI``, a command was refused: ``EXEC`` answers ``EXECABORT``."""
        if self.queued is not None:
            self.failed = True

    def end(self) -> tuple[list[Sequence[bytes]], bool, int | None]:
        """``EXEC``: the commands queued, whether it failed, their slot; out of ``MULTI``."""
        assert self.queued is not None
        ended = self.queued, self.failed, self.slot
        self.clear()
        return ended

    def clear(self) -> None:
        """Out of ``MULTI``, nothing queued (``DISCARD``, ``RESET``, a refused ``EXEC``)."""
        self.queued, self.failed, self.slot = None, False, None

    def forget_watch(self) -> None:
        self.watched = self.watch_slot = None


class Transaction(Entry):
    """MULTI, the queued commands and EXEC, sent together to one shard at EXEC."""

    __slots__ = ("commands", "futures", "slot")

    holds = True
    """It is sent in the writer's turn (:func:`run`), so nothing after it is planned
    (and sent) before it is answered: a command pipelined behind EXEC must see what
    the transaction wrote, and must not run before it."""

    def __init__(self, commands: list[Sequence[bytes]], slot: int | None) -> None:
        super().__init__("EXEC")
        self.commands = commands
        self.slot = slot
        self.futures: list[asyncio.Future[bytes]] = []

    async def resolve(self, session: ClusterSession) -> bytes:
        return await run(session, self)


def queue(session: ClusterSession, name: str, args: list[bytes]) -> Entry:
    """A command between MULTI and EXEC: checked and queued here, sent at EXEC."""
    state, table = session.transaction, session.table
    assert state.queued is not None and table is not None
    if name in _NOT_IN_TRANSACTION:
        state.fail()
        return Local(
            name, error(f"ERR {name} cannot run in a transaction through fleetgate: {_WHY_TX}")
        )
    slots = {key_slot(args[p]) for p in table.key_positions(args)}
    if state.slot is not None:
        slots.add(state.slot)
    if len(slots) > 1:
        state.fail()
        return Local(
            name,
            error(
                "CROSSSLOT Keys in request don't hash to the same slot (a transaction "
                f"through fleetgate runs on one shard: {_WHY_TX})"
            ),
        )
    if slots:
        state.slot = slots.pop()
    state.queued.append(args)
    return Local(name, _QUEUED)


def refused(session: ClusterSession, name: str, reply: bytes) -> bytes:
    """The engine answers ``name`` with ``reply`` (a hook refusal, say) instead of
    running it: as the server does for a command it rejects, an error inside ``MULTI``
    marks the transaction failed, and a refused ``EXEC`` ends the transaction
    (``EXECABORT ... because of: <error>``)."""
    if reply[:1] != b"-":
        return reply
    state = session.transaction
    if name == "EXEC":
        if state.queued is not None:
            state.clear()
            unwatch(session)
        return _EXECABORT_BECAUSE + reply[1:]
    state.fail()
    return reply


def multi(session: ClusterSession, name: str, args: list[bytes]) -> Entry:
    state = session.transaction
    if state.queued is not None:  # the server rejects it, so the transaction fails
        state.fail()
        return Local(name, error("ERR MULTI calls can not be nested"))
    if len(args) != 1:
        return Local(name, error("ERR wrong number of arguments for 'multi' command"))
    state.begin()
    return Local(name, OK)


def exec_(session: ClusterSession, name: str, args: list[bytes]) -> Entry:
    state = session.transaction
    if state.queued is None:
        return Local(name, error("ERR EXEC without MULTI"))
    commands, failed, slot = state.end()
    if failed:
        unwatch(session)
        return Local(name, _EXECABORT)
    return Transaction(commands, slot)


def discard(session: ClusterSession, name: str, args: list[bytes]) -> Entry:
    state = session.transaction
    if state.queued is None:
        return Local(name, error("ERR DISCARD without MULTI"))
    state.clear()
    unwatch(session)
    return Local(name, OK)


def watch(session: ClusterSession, name: str, args: list[bytes]) -> Entry:
    state, table = session.transaction, session.table
    assert table is not None
    if state.queued is not None:  # the server rejects it, so the transaction fails
        state.fail()
        return Local(name, error("ERR WATCH inside MULTI is not allowed"))
    slots = {key_slot(args[p]) for p in table.key_positions(args)}
    if state.watch_slot is not None:
        slots.add(state.watch_slot)
    if len(slots) > 1:
        return Local(
            name,
            error(
                "CROSSSLOT Keys in request don't hash to the same slot (watched keys "
                f"through fleetgate must share one slot: {_WHY_TX})"
            ),
        )
    if not slots:
        return Forward(name, session.request(args, None))
    slot = slots.pop()
    request = session.request(args, slot)
    state.watched, state.watch_slot = request.address, slot

    def watched(frame: bytes) -> bytes:
        # WATCH ran where its redirects led: the transaction must run there too
        if state.watch_slot == slot and frame[:1] not in (b"-", b"!"):
            state.watched = request.address
        return frame

    return Forward(name, request, watched)


def unwatch(session: ClusterSession) -> None:
    """Forget the watched keys (and tell the connection that watched them)."""
    state = session.transaction
    if state.watched is not None:
        for future in session.link(state.watched).send(_UNWATCH):
            future.add_done_callback(retrieve)
    state.forget_watch()


def unwatch_command(session: ClusterSession, name: str, args: list[bytes]) -> Entry:
    unwatch(session)
    return Local(name, OK)


async def run(session: ClusterSession, tx: Transaction) -> bytes:
    """Send the transaction (the writer's turn) and answer EXEC's reply.

    A node refuses the whole transaction, running none of it, when its slot is not
    served there: at queue time (``MOVED``, then ``EXECABORT``) or at ``EXEC`` (``ASK``
    while the slot migrates and a key has left, ``MOVED``, ``TRYAGAIN`` while a
    multi-key transaction waits for the migration's end, ``CLUSTERDOWN``). It is then
    sent again: after ``ASK`` with ``ASKING`` at the importing node, after ``MOVED`` at
    the new owner, after ``TRYAGAIN``/``CLUSTERDOWN`` at the same node following a
    backoff. A transaction under ``WATCH`` cannot be moved to another connection
    (the watch would not follow): it is answered as a failed ``WATCH`` (null), which
    a client's optimistic-locking loop retries."""
    state = session.transaction
    watched = state.watched
    address = watched or (session.owner(tx.slot) if tx.slot is not None else session.home())
    body = _body(tx.commands)
    # a WATCH that followed ASK ran at the importing node: so does its transaction
    slot = state.watch_slot
    asking = watched is not None and slot is not None and session.owner(slot) != watched
    redirects, retries = 0, 0
    while True:
        link = session.link(address)
        try:
            if asking:
                ask, *futures = link.send(prefixed(_ASKING, body), len(tx.commands) + 3)
                ask.add_done_callback(retrieve)
            else:
                futures = link.send(body, len(tx.commands) + 2)
            frames = [await future for future in futures]
        except LinkError as exc:
            state.forget_watch()
            return error(f"ERR fleetgate: {exc}")
        reply = frames[-1]
        redirect = _redirect(reply)
        if redirect is None and reply.startswith(b"-EXECABORT"):
            redirect = next((r for f in frames[1:-1] if (r := _redirect(f)) is not None), None)
        if redirect is None:
            state.forget_watch()
            return reply
        code, target = redirect
        session.state.redirects[code] += 1
        if watched is not None:
            unwatch(session)  # the node discarded it; the watch cannot follow
            return _NULL3 if session.setup.proto == 3 else _NULL2
        session.hold()  # nothing ran: send it again once what was sent before is in
        if code in ("MOVED", "ASK") and target is not None and redirects < MAX_REDIRECTS:
            redirects += 1
            if code == "MOVED" and tx.slot is not None:
                await session.follow_moved(tx.slot, target)
            address, asking = target, code == "ASK"
        elif code in ("TRYAGAIN", "CLUSTERDOWN") and retries < len(BACKOFF):
            await asyncio.sleep(BACKOFF[retries])
            retries += 1
            if code == "CLUSTERDOWN":
                await session.refresh_quietly()
                asking = False
                address = session.owner(tx.slot) if tx.slot is not None else session.home()
        else:
            return _gave_up(reply, code, tx.slot)


def _body(commands: list[Sequence[bytes]]) -> Payload:
    """``MULTI``, the commands and ``EXEC`` as they go to the node: the small parts
    joined, a large argument a piece of its own (joining would copy it whole on the
    event loop)."""
    pieces: list[bytes] = []
    small = [_MULTI]
    for command in commands:
        payload = encode_payload(command)
        if isinstance(payload, bytes):
            small.append(payload)
            continue
        for piece in payload:
            if len(piece) < LARGE_ARGUMENT:
                small.append(piece)
            else:
                if small:
                    pieces.append(b"".join(small))
                pieces.append(piece)
                small = []
    small.append(_EXEC)
    if not pieces:
        return b"".join(small)
    pieces.append(b"".join(small))
    return tuple(pieces)


def _redirect(frame: bytes) -> tuple[str, Address | None] | None:
    """``(code, address)`` of a ``MOVED``/``ASK``/``TRYAGAIN``/``CLUSTERDOWN`` error."""
    if not frame.startswith(_REDIRECTS):
        return None
    parts = frame[1:].rstrip(b"\r\n").split(b" ")
    code = parts[0].decode()
    if code not in ("MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN"):
        return None
    return code, parse_address(parts[2]) if code in ("MOVED", "ASK") and len(parts) >= 3 else None


def _gave_up(reply: bytes, code: str, slot: int | None) -> bytes:
    """The answer once the retries are spent: the server's own ``TRYAGAIN`` or
    ``CLUSTERDOWN``; a ``MOVED``/``ASK`` names a node address the client cannot use,
    so it becomes a ``TRYAGAIN`` that says what happened."""
    if code in ("TRYAGAIN", "CLUSTERDOWN") and reply[:1] == b"-":
        return reply
    where = f"slot {slot}" if slot is not None else "its slot"
    return error(
        f"TRYAGAIN fleetgate: the transaction's {where} kept moving between nodes; "
        "nothing ran, try again"
    )
