"""``AUTH`` and ``HELLO`` from the client.

They pass the agent's gate (the db user only) and login strategy as in single-node
mode, then go to the configuration endpoint's connection (whose reply the client gets)
and to every open shard connection; a credential or protocol the server accepted is
remembered, so connections opened later are made the same (``ClusterSession._prepare``).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from dbservice.proxy.commands import parse_hello

from .entries import Entry, Forward, Local, Request, chain, retrieve
from .link import LinkError
from .resp import error_of

if TYPE_CHECKING:
    from .session import ClusterSession


def login_command(session: ClusterSession, name: str, args: list[bytes]) -> Entry:
    hooks = session._hooks
    verdict = hooks.on_command(name, len(args), args)
    if verdict is not None:
        session.stats.refused += 1
        return Local(name, verdict, counted=False)
    if name == "AUTH":
        if len(args) not in (2, 3):
            return _to_seed(session, name, args, None)
        action = hooks.on_auth(args[1] if len(args) == 3 else None, args[-1])
        if action.reply is not None:
            return Local(name, action.reply, counted=False)
        command = list(action.replacement or args)
        return _to_seed(session, name, command, command)
    hello = parse_hello(args)
    if hello is None:
        return _to_seed(session, name, args, None)
    action = hooks.on_hello(hello)
    if action.reply is not None:
        return Local(name, action.reply, counted=False)
    command = list(action.replacement or args)
    sent = parse_hello(command)
    creds = None
    if sent is not None:
        if sent.protover is not None:
            session._proto = sent.protover
        if sent.username is not None and sent.password is not None:
            creds = [b"AUTH", sent.username, sent.password]
    entry = _to_seed(session, name, command, creds)
    protover = sent.protover if sent is not None else None
    setname = sent.setname if sent is not None else None

    def done(frame: bytes) -> bytes:
        if error_of(frame) is None:
            if protover is not None:
                session.resp3 = protover == 3
            if setname is not None:
                session._name = setname
        return frame

    assert isinstance(entry, Forward)
    entry.after = chain(entry.after, done)
    return entry


def _to_seed(
    session: ClusterSession, name: str, command: list[bytes], creds: list[bytes] | None
) -> Entry:
    """AUTH / HELLO: answered by the seed connection, also sent to every open link."""
    request = Request(command, None, session._seed.address)
    session._send(request)
    if creds is not None or name == "HELLO":
        for link in list(session._links.values()):
            if link is not session._seed and link.failed is None and not link.closed:
                with contextlib.suppress(LinkError):
                    for future in link.send(request.payload):
                        future.add_done_callback(retrieve)

    def confirm(frame: bytes) -> bytes:
        if creds is not None and error_of(frame) is None:
            session._creds = creds
        return frame

    return Forward(name, request, confirm)
