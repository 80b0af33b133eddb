"""``AUTH``, ``HELLO`` and ``RESET`` from the client.

AUTH and HELLO pass the agent's gate (the db user only) and login strategy as in
single-node mode, then go to the configuration endpoint's connection (whose reply the
client gets) and to every open shard connection; a credential or protocol the server
accepted is remembered, so connections opened later are made the same
(``ClusterSession._prepare``).

RESET goes to every open connection of the session, each followed by the agent's login
as the db user (:meth:`~dbservice.engine.proxy.SessionHooks.on_reset`), and nothing more is
planned until all of them have answered: the session is never ``default``, not even
for one command. A login refused ends the session.

What the client set up this way is a :class:`ClientSetup`, the session's ``setup``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Final

from dbservice.engine.proxy.commands import parse_hello
from dbservice.engine.proxy.errors import error_reply

from . import transactions
from .entries import Entry, Forward, Local, chain, retrieve
from .link import Link, LinkError
from .resp import encode_command, error_of

if TYPE_CHECKING:
    from .session import ClusterSession

logger = logging.getLogger(__name__)

_RESET: Final = encode_command([b"RESET"])
_RESET_OK: Final = b"+RESET\r\n"


class ClientSetup:
    """What the client set on its connection, made the same on every connection the
    session opens later: its last ``AUTH`` the server accepted, its protocol and its
    name."""

    __slots__ = ("creds", "name", "pinned", "proto", "resp3")

    def __init__(self) -> None:
        self.proto = 2
        """The protocol the client asked for (its last ``HELLO`` sent)."""
        self.resp3 = False
        """The protocol the server confirmed: RESP3 replies."""
        self.creds: list[bytes] | None = None
        """The client's last ``AUTH`` the server accepted (replayed on new links)."""
        self.name: bytes | None = None
        self.pinned = False
        """The client set a mode of the connections themselves that is not replayed
        (``CLIENT NO-EVICT``/``NO-TOUCH``): the session keeps its shard connections
        however long they go unused."""

    def replay(self, *, logged_in: bool) -> list[list[bytes]]:
        """The commands that make a new connection the same, after the agent's login
        (``logged_in``: the login strategy already authenticated it)."""
        commands = []
        if not logged_in and self.creds is not None:
            commands.append(self.creds)
        if self.proto == 3:
            commands.append([b"HELLO", b"3"])
        if self.name:
            commands.append([b"CLIENT", b"SETNAME", self.name])
        return commands

    def reset(self, *, keep_creds: bool) -> None:
        """``RESET``: RESP2, no name; the credentials go unless the agent logs in again
        with its own (``keep_creds``)."""
        self.proto, self.resp3, self.name = 2, False, None
        if not keep_creds:
            self.creds = None


def login_command(session: ClusterSession, name: str, args: list[bytes]) -> Entry:
    hooks = session.hooks
    verdict = hooks.on_command(name, len(args), args)
    if verdict is not None:
        session.stats.refused += 1
        return Local(name, transactions.refused(session, name, verdict), counted=False)
    if name == "AUTH":
        if len(args) not in (2, 3):
            return _to_seed(session, name, args, None)
        action = hooks.on_auth(args[1] if len(args) == 3 else None, args[-1])
        if action.reply is not None:
            return Local(name, transactions.refused(session, name, action.reply), counted=False)
        command = list(action.replacement or args)
        return _to_seed(session, name, command, command)
    hello = parse_hello(args)
    if hello is None:
        return _to_seed(session, name, args, None)
    action = hooks.on_hello(hello)
    if action.reply is not None:
        return Local(name, transactions.refused(session, name, action.reply), counted=False)
    command = list(action.replacement or args)
    sent = parse_hello(command)
    creds = None
    setup = session.setup
    if sent is not None:
        if sent.protover is not None:
            setup.proto = sent.protover
        if sent.username is not None and sent.password is not None:
            creds = [b"AUTH", sent.username, sent.password]
    entry = _to_seed(session, name, command, creds)
    protover = sent.protover if sent is not None else None
    setname = sent.setname if sent is not None else None

    def done(frame: bytes) -> bytes:
        if error_of(frame) is None:
            if protover is not None:
                setup.resp3 = protover == 3
            if setname is not None:
                setup.name = setname
        return frame

    assert isinstance(entry, Forward)
    entry.after = chain(entry.after, done)
    return entry


def _to_seed(
    session: ClusterSession, name: str, command: list[bytes], creds: list[bytes] | None
) -> Entry:
    """AUTH / HELLO: answered by the seed connection, also sent to every open link."""
    request = session.request(command, None, session.seed_address)
    if creds is not None or name == "HELLO":
        for link in session.open_links(with_seed=False):
            with contextlib.suppress(LinkError):
                for future in link.send(request.payload):
                    future.add_done_callback(retrieve)
    setup = session.setup

    def confirm(frame: bytes) -> bytes:
        if creds is not None and error_of(frame) is None:
            setup.creds = creds
        return frame

    return Forward(name, request, confirm)


async def reset(session: ClusterSession, name: str) -> Entry:
    """``RESET`` (no arguments) on every open connection, each logged in again."""
    hold = session.hooks.on_reset()
    try:
        command = await hold if hold is not None else None
        login = list(command) if command is not None else None
    except Exception as exc:
        logger.warning("cannot log a cluster session in again after RESET: %s", exc)
        return Local(name, error_reply(f"fleetgate: {exc}"), close=True)
    session.transaction.clear()
    transactions.unwatch(session)
    session.pubsub.reset()
    session.setup.reset(keep_creds=login is not None)
    payload = _RESET + (encode_command(login) if login else b"")
    seed = session.live_seed()
    sent: list[tuple[Link, list[asyncio.Future[bytes]]]] = []
    for link in session.open_links(with_seed=True):
        with contextlib.suppress(LinkError):
            sent.append((link, link.send(payload, 2 if login else 1)))
    reply = _RESET_OK
    for link, futures in sent:
        results = await asyncio.gather(*futures, return_exceptions=True)
        frames = [f for f in results if isinstance(f, bytes)]
        if len(frames) < len(results):
            continue  # the connection is gone; a new one is logged in when dialled
        if link is seed:
            reply = frames[0]
        if login and (err := error_of(frames[1])) is not None:
            logger.warning(
                "node %s refused the agent's login after RESET: %s",
                link.name,
                err.decode("utf-8", "replace"),
            )
            return Local(
                name,
                error_reply(
                    "fleetgate: the server refused the agent's login after RESET, so the "
                    "session ends"
                ),
                close=True,
            )
    return Local(name, reply)
