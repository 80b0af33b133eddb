"""The commands the engine plans itself rather than routing by key: whole-cluster
ones (sent to every primary, answers merged by :mod:`.merge`), the one-node
``CLUSTER`` view, connection commands (``CLIENT``, ``SELECT``, ``RESET``...), and the
table naming the handler of each (transactions and pub/sub included).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Final

from . import merge, transactions
from .entries import Entry, Fan, Forward, Local, retrieve
from .link import LinkError
from .resp import OK, Payload, encode_value, error, error_of
from .slots import key_slot
from .topology import Address

if TYPE_CHECKING:
    from .session import ClusterSession

NOT_HERE: Final = "use fleetgate db connect --node <shard> to send it to one shard"


def everywhere(
    session: ClusterSession,
    name: str,
    args: Sequence[bytes],
    combine: Callable[[list[bytes]], bytes],
) -> Entry:
    """The command to every primary, the replies combined into one."""
    assert session.topology is not None
    primaries = [node.address for node in session.topology.primaries]
    return Fan(name, [session.request(args, None, a) for a in primaries], combine)


def _dbsize(session: ClusterSession, name: str, args: list[bytes]) -> Entry:
    if len(args) != 1:
        return Forward(name, session.request(args, None))
    return everywhere(session, name, args, merge.total)


def _keys(session: ClusterSession, name: str, args: list[bytes]) -> Entry:
    return everywhere(session, name, args, lambda frames: merge.concat(frames, session.resp3))


def _flush(session: ClusterSession, name: str, args: list[bytes]) -> Entry:
    return everywhere(session, name, args, merge.all_ok)


def _randomkey(session: ClusterSession, name: str, args: list[bytes]) -> Entry:
    assert session.topology is not None
    primaries = [node.address for node in session.topology.primaries]
    random.shuffle(primaries)
    return Fan(name, [session.request(args, None, a) for a in primaries], merge.random_key)


def _scan(session: ClusterSession, name: str, args: list[bytes]) -> Entry:
    assert session.topology is not None
    if len(args) < 2:
        return Forward(name, session.request(args, None))
    primaries = [node.address for node in session.topology.primaries]
    where = merge.scan_cursor(args[1], len(primaries))
    if where is None:
        return Local(name, error("ERR invalid cursor"))
    index, position = where
    sub = [args[0], b"%d" % position, *args[2:]]
    request = session.request(sub, None, primaries[index])
    count = len(primaries)
    return Forward(
        name, request, lambda frame: merge.scan_reply(frame, index, count, session.resp3)
    )


def _script(session: ClusterSession, name: str, args: list[bytes]) -> Entry:
    sub = args[1].upper() if len(args) > 1 else b""
    if sub in (b"LOAD", b"FLUSH"):
        return everywhere(session, name, args, merge.first)
    if sub == b"EXISTS":
        return everywhere(session, name, args, lambda frames: merge.all_true(frames, session.resp3))
    if sub in (b"KILL", b"DEBUG"):
        return Local(name, error(f"ERR SCRIPT {sub.decode()} runs on one node: {NOT_HERE}"))
    return Forward(name, session.request(args, None))


def _function(session: ClusterSession, name: str, args: list[bytes]) -> Entry:
    sub = args[1].upper() if len(args) > 1 else b""
    if sub in (b"LOAD", b"DELETE", b"FLUSH", b"RESTORE"):
        return everywhere(session, name, args, merge.first)
    if sub in (b"KILL", b"STATS"):
        return Local(name, error(f"ERR FUNCTION {sub.decode()} runs on one node: {NOT_HERE}"))
    return Forward(name, session.request(args, None))


def _info(session: ClusterSession, name: str, args: list[bytes]) -> Entry:
    assert session.topology is not None
    count = len(session.topology.primaries)
    return everywhere(session, name, args, lambda frames: merge.info(frames, count))


def _cluster(session: ClusterSession, name: str, args: list[bytes]) -> Entry:
    topology = session.topology
    assert topology is not None
    sub = args[1].upper() if len(args) > 1 else b""
    nid = merge.node_id(session.database)
    address: Address = ("", session.client_port())
    resp3 = session.resp3
    if sub == b"INFO":
        return Forward(
            name,
            session.request(args, None),
            lambda frame: merge.cluster_info(frame, topology),
        )
    if sub == b"SLOTS":
        return Local(name, merge.cluster_slots(topology, address, nid, resp3))
    if sub == b"SHARDS":
        return Local(name, merge.cluster_shards(topology, address, nid, resp3))
    if sub == b"NODES":
        return Local(name, merge.cluster_nodes(topology, address, nid))
    if sub in (b"MYID", b"MYSHARDID"):
        return Local(name, encode_value(nid.encode(), resp3))
    if sub == b"KEYSLOT" and len(args) == 3:
        return Local(name, b":%d\r\n" % key_slot(args[2]))
    if sub in (b"COUNTKEYSINSLOT", b"GETKEYSINSLOT") and len(args) >= 3:
        try:
            slot = int(args[2])
        except ValueError:
            slot = -1
        if 0 <= slot < 16384:
            return Forward(name, session.request(args, slot))
    if sub == b"HELP":
        return Forward(name, session.request(args, None))
    return Local(name, error(f"ERR CLUSTER {sub.decode('latin-1')} is per node: {NOT_HERE}"))


def _client(session: ClusterSession, name: str, args: list[bytes]) -> Entry:
    sub = args[1].upper() if len(args) > 1 else b""
    if sub == b"SETNAME" and len(args) == 3:
        request = session.request(args, None)
        _broadcast(session, request.payload, skip=request.address)
        value, setup = args[2], session.setup

        def named(frame: bytes) -> bytes:
            if error_of(frame) is None:
                setup.name = value or None
            return frame

        return Forward(name, request, named)
    if sub == b"GETNAME" and len(args) == 2:
        return Local(name, encode_value(session.setup.name, session.resp3))
    if sub == b"ID" and len(args) == 2:
        return Local(name, b":%d\r\n" % session.client_id)
    if sub == b"SETINFO":
        return Local(name, OK)
    if sub in (b"NO-EVICT", b"NO-TOUCH"):
        session.setup.pinned = True
        request = session.request(args, None)
        _broadcast(session, request.payload, skip=request.address)
        return Forward(name, request)
    if sub in (b"INFO", b"LIST", b"HELP", b"TRACKINGINFO", b"GETREDIR"):
        return Forward(name, session.request(args, None))
    return Local(
        name,
        error(f"ERR CLIENT {sub.decode('latin-1')} is not supported in cluster mode: {NOT_HERE}"),
    )


def _broadcast(session: ClusterSession, payload: Payload, *, skip: Address) -> None:
    """Also to every other open shard connection, their replies dropped."""
    for link in session.open_links(with_seed=False):
        if link.address != skip:
            with contextlib.suppress(LinkError):
                for future in link.send(payload):
                    future.add_done_callback(retrieve)


def _select(session: ClusterSession, name: str, args: list[bytes]) -> Entry:
    if len(args) == 2 and args[1] == b"0":
        return Local(name, OK)
    return Local(name, error("ERR SELECT is not allowed in cluster mode"))


def _ok(session: ClusterSession, name: str, args: list[bytes]) -> Entry:
    return Local(name, OK)


def _refuse(session: ClusterSession, name: str, args: list[bytes]) -> Entry:
    session.stats.refused += 1
    return Local(name, error(f"ERR {name} is not supported in cluster mode: {NOT_HERE}"))


def _wait(session: ClusterSession, name: str, args: list[bytes]) -> Entry:
    address = session.last or session.home()
    return Forward(name, session.request(args, None, address))


def _quit(session: ClusterSession, name: str, args: list[bytes]) -> Entry:
    return Local(name, OK, close=True)


def _ping(session: ClusterSession, name: str, args: list[bytes]) -> Entry:
    if session.pubsub.active:
        return session.pubsub.ping(name, args)
    return Forward(name, session.request(args, None))


def _subscribe(session: ClusterSession, name: str, args: list[bytes]) -> Entry:
    if session.transaction.queued is not None:
        return Local(name, error(f"ERR {name} inside MULTI is not supported through the proxy"))
    return session.pubsub.command(name, args)


Handler = Callable[["ClusterSession", str, list[bytes]], Entry]
HANDLERS: Final[dict[str, Handler]] = {
    "DBSIZE": _dbsize,
    "KEYS": _keys,
    "SCAN": _scan,
    "RANDOMKEY": _randomkey,
    "FLUSHALL": _flush,
    "FLUSHDB": _flush,
    "SCRIPT": _script,
    "FUNCTION": _function,
    "INFO": _info,
    "CLUSTER": _cluster,
    "CLIENT": _client,
    "SELECT": _select,
    "READONLY": _ok,
    "READWRITE": _ok,
    "ASKING": _refuse,
    "MONITOR": _refuse,
    "WAIT": _wait,
    "WAITAOF": _wait,
    "QUIT": _quit,
    "PING": _ping,
    "MULTI": transactions.multi,
    "EXEC": transactions.exec_,
    "DISCARD": transactions.discard,
    "WATCH": transactions.watch,
    "UNWATCH": transactions.unwatch_command,
    "SUBSCRIBE": _subscribe,
    "PSUBSCRIBE": _subscribe,
    "SSUBSCRIBE": _subscribe,
    "UNSUBSCRIBE": _subscribe,
    "PUNSUBSCRIBE": _subscribe,
    "SUNSUBSCRIBE": _subscribe,
}
"""The commands planned by a handler of their own; every other goes by its keys."""
