"""Planning one client command: the hooks (roles, audit), then where it goes.

Most commands go to the primary owning their keys' slot (keys from the command table
the server reports); ``MGET`` / ``MSET`` / ``DEL`` / ``UNLINK`` / ``EXISTS`` / ``TOUCH``
across slots are split per slot and merged; the commands named in
:data:`.commands.HANDLERS` are planned by their own handler; keyless commands go to the
first shard's primary. Every request is sent at once (:meth:`ClusterSession._request`):
planning never waits for a reply.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from . import merge, transactions
from .auth import login_command, reset
from .commands import HANDLERS
from .entries import Entry, Fan, Forward, Local, Request
from .keyspecs import CommandTable
from .link import LinkError
from .resp import Payload, error
from .slots import key_slot
from .topology import TopologyError

if TYPE_CHECKING:
    from .session import ClusterSession

SPLIT: Final = frozenset({"MGET", "MSET", "DEL", "UNLINK", "EXISTS", "TOUCH"})
"""Multi-key commands split per slot when their keys are in several slots."""
_SUBSCRIBED_OK = frozenset(
    {"SUBSCRIBE", "PSUBSCRIBE", "SSUBSCRIBE", "UNSUBSCRIBE", "PUNSUBSCRIBE", "SUNSUBSCRIBE",
     "PING", "QUIT", "RESET"}
)  # fmt: skip

_NOT_QUEUED: Final = ("EXEC", "DISCARD", "MULTI", "WATCH", "QUIT")
"""Commands inside MULTI that are not queued."""


def plan_now(
    session: ClusterSession, args: list[bytes], raw: Payload | None = None
) -> Entry | None:
    """:func:`plan` without a coroutine, for a command whose planning cannot wait (all
    but the first one of a session, whose command table may still be unknown, and
    ``RESET``); None, having done nothing, for those (then :func:`plan`). A command
    with one key, as the command table says, with a number of arguments its arity
    allows, goes to its slot's owner with no other lookup."""
    spellings = session.spellings
    name = spellings.get(args[0]) or spellings.canonical(args[0])
    table = session.table
    pubsub = session.pubsub  # RESP2 subscribed mode (``PubSub.active``), spelled out
    active = bool(pubsub.channels or pubsub.patterns or pubsub.shard_channels) and not session.resp3
    if (name == "AUTH" or name == "HELLO") and not active:
        session.stats.commands += 1
        return login_command(session, name, args)
    if table is None or (name == "RESET" and len(args) == 1):
        return None
    session.stats.commands += 1
    verdict = session.hooks.on_command(name, len(args), args)
    if verdict is not None:
        session.stats.refused += 1
        return Local(name, transactions.refused(session, name, verdict), counted=False)
    simple = table.simple.get(name)
    if simple is not None and not active and session.transaction.queued is None:
        arity, at = simple
        argc = len(args)
        allowed = argc == arity or (arity < 0 and argc >= -arity)
        if allowed and at < argc and name not in HANDLERS:
            return session.forward(name, args, key_slot(args[at]), raw)
    return _planned(session, table, name, args, raw)


async def plan(session: ClusterSession, args: list[bytes], raw: Payload | None = None) -> Entry:
    """The entry for one client command, its request(s) already sent."""
    name = session.spellings.get(args[0]) or session.spellings.canonical(args[0])
    session.stats.commands += 1
    pubsub = session.pubsub
    if (name == "AUTH" or name == "HELLO") and not pubsub.active:
        return login_command(session, name, args)
    verdict = session.hooks.on_command(name, len(args), args)
    if verdict is not None:
        session.stats.refused += 1
        return Local(name, transactions.refused(session, name, verdict), counted=False)
    table = session.table
    if table is None:
        try:
            await session.learn()
        except (LinkError, TopologyError, ValueError) as exc:
            return Local(name, error(f"ERR fleetgate: cannot learn the cluster: {exc}"))
        table = session.table
        assert table is not None
    if name == "RESET" and len(args) == 1:  # also inside MULTI and subscribed, as the server
        return await reset(session, name)
    return _planned(session, table, name, args, raw)


def _planned(
    session: ClusterSession,
    table: CommandTable,
    name: str,
    args: list[bytes],
    raw: Payload | None,
) -> Entry:
    """What follows the hooks and the command table: arity, subscribed mode, MULTI,
    the handlers, then the route."""
    pubsub = session.pubsub
    if (wrong := table.wrong_arity(args)) is not None:
        return _wrong_arity(session, name, wrong, args, raw)
    if pubsub.active and name not in _SUBSCRIBED_OK:
        return _subscribed(session, table, name, args, raw)
    if session.transaction.queued is not None and name not in _NOT_QUEUED:
        return transactions.queue(session, name, args)
    handler = HANDLERS.get(name)
    if handler is not None:
        return handler(session, name, args)
    return _route(session, table, name, args, raw)


class Spellings(dict[bytes, str]):
    """A session's command names by the client's spelling, for the first 256 spellings
    (``get`` first: the common case is a spelling seen before)."""

    __slots__ = ()

    def canonical(self, raw: bytes) -> str:
        """The command name in upper case, remembered."""
        name = raw.upper().decode("latin-1")  # ASCII case only, as the server
        if len(self) < 256:
            self[raw] = name
        return name


def _subscribed(
    session: ClusterSession, table: CommandTable, name: str, args: list[bytes], raw: Payload | None
) -> Entry:
    """A command the server refuses in RESP2 subscribed mode, answered as the server
    answers it: an unknown command or subcommand, or a wrong number of arguments, is
    the server's own error (checked before subscribed mode, and nothing runs: it goes
    to a shard as it would outside subscribed mode); any other is refused here, named
    as the server names it (``get``, ``client|id``)."""
    info = table.lookup(args)
    argc = len(args)
    if (
        info is None
        or (info.subcommands and argc > 1)  # the container: its subcommand is unknown
        or (argc != info.arity if info.arity >= 0 else argc < -info.arity)
    ):
        return _route(session, table, name, args, raw)
    return Local(
        name,
        error(
            f"ERR Can't execute '{info.name}': only (P|S)SUBSCRIBE / "
            "(P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context"
        ),
    )


def _wrong_arity(
    session: ClusterSession, name: str, spelled: str, args: list[bytes], raw: Payload | None
) -> Entry:
    """A command with a number of arguments its arity refuses: the server's own error,
    and nothing else happens (no handler, no key lookup, no split). Outside MULTI it
    goes to a shard as it is, which answers that error; inside MULTI the error is the
    server's wording and the transaction is marked failed, as the server does."""
    if session.transaction.queued is not None:
        wrong = f"wrong number of arguments for '{spelled}' command"
        if name == "EXEC":  # the server discards the transaction at once
            return Local(name, transactions.refused(session, name, b"-%s\r\n" % wrong.encode()))
        session.transaction.fail()
        return Local(name, error(f"ERR {wrong}"))
    return Forward(name, session.request(args, None, payload=raw))


def _route(
    session: ClusterSession,
    table: CommandTable,
    name: str,
    args: list[bytes],
    raw: Payload | None = None,
) -> Entry:
    at = table.single.get(args[0].lower(), 0)
    if 0 < at < len(args):  # one key: no spec to walk
        request = session.request(args, key_slot(args[at]), payload=raw)
        session.last = request.address
        return Forward(name, request)
    positions = table.key_positions(args)
    if not positions:
        return Forward(name, session.request(args, None, payload=raw))
    slot = key_slot(args[positions[0]])
    if len(positions) > 1 and name in SPLIT:
        slots = [key_slot(args[p]) for p in positions]
        if any(s != slot for s in slots):
            return _split(session, name, args, positions, slots)
    request = session.request(args, slot, payload=raw)
    session.last = request.address
    return Forward(name, request)


def _split(
    session: ClusterSession, name: str, args: list[bytes], positions: list[int], slots: list[int]
) -> Entry:
    groups: dict[int, list[int]] = {}
    for position, slot in zip(positions, slots, strict=True):
        groups.setdefault(slot, []).append(position)
    requests: list[Request] = []
    order: dict[int, tuple[int, int]] = {}
    if name == "MSET" and len(args) % 2 == 0:  # a key without its value
        return Local(name, error("ERR wrong number of arguments for 'mset' command"))
    for slot, members in groups.items():
        sub: list[bytes] = [args[0]]
        for i, position in enumerate(members):
            sub.append(args[position])
            if name == "MSET":
                sub.append(args[position + 1])
            order[position] = (len(requests), i)
        requests.append(session.request(sub, slot))
    if name == "MGET":
        where = [order[p] for p in positions]
        return Fan(name, requests, lambda frames: merge.regroup(where, frames, session.resp3))
    if name == "MSET":
        return Fan(name, requests, merge.all_ok)
    return Fan(name, requests, merge.total)
