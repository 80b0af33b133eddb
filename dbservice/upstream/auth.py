"""An IAM login on the wire: ``AUTH <user> <token>`` on a fresh upstream connection, and
a fresh ``AUTH`` on a live one before MemoryDB's 12-hour cut-off.

MemoryDB drops an IAM-authenticated connection 12 hours after its last ``AUTH``;
:func:`keep_authenticated` renews it through a :class:`CommandInjector` (see its
docstring for what the proxy engine must provide).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, Protocol

from dbservice.upstream.iam import IamAuth, IamError, IamTarget
from fleetgate.resp import encode_command

logger = logging.getLogger(__name__)

REAUTH_EVERY: Final = 11 * 3600.0
"""A live IAM connection is re-authenticated this long after its last AUTH (AWS cuts it
at 12 hours)."""
REAUTH_RETRY: Final = 60.0


# -- on the wire ----------------------------------------------------------------------


async def send_auth(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, user: str, token: str
) -> bytes:
    """``AUTH user token`` on a fresh connection; the reply line (``+OK`` or an error
    such as ``-WRONGPASS ...``) without its CRLF. EOFError when the server hangs up."""
    writer.write(encode_command([b"AUTH", user.encode(), token.encode()]))
    await writer.drain()
    line = await reader.readline()
    if not line:
        raise EOFError("the server closed the connection during AUTH")
    return line.rstrip(b"\r\n")


async def login(
    auth: IamAuth,
    target: IamTarget,
    user: str,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> None:
    """Log ``user`` in on a fresh connection by IAM token; raises :class:`IamError`
    with the reason when that cannot work or MemoryDB refuses."""
    await auth.check_login(target, user)
    token = await auth.token(target, user)
    reply = await send_auth(reader, writer, user, token)
    if reply == b"+OK":
        return
    logger.info(
        "MemoryDB refused IAM login of %s on %s: %s",
        user,
        target.cluster,
        reply[:200].decode(errors="replace"),
    )
    if reply.startswith((b"-WRONGPASS", b"-NOPERM")):
        raise await auth.diagnose(target, user)
    raise IamError(
        f"MemoryDB refused IAM login of {user!r}: {reply[1:200].decode(errors='replace')}"
    )


# -- re-authentication of live sessions -------------------------------------------------


class CommandInjector(Protocol):
    """Sends a command of the agent's own on a live session's upstream connection, with
    its reply kept from the client. ``ProxySession.inject`` is the engine's; what it
    provides:

    * write the command only between two client commands (the client parser at a
      command boundary), never inside ``MULTI`` (IAM AUTH is refused there), never in
      RESP2 subscribed mode (AUTH is not allowed there) or after ``MONITOR``; return
      False when it cannot now (the caller retries later);
    * queue a pending item that the reply parser consumes *without* writing it to the
      client, and call ``on_reply(ok)`` with whether it was an error reply.
    """

    def inject(self, args: Sequence[bytes], on_reply: Callable[[bool], None]) -> bool: ...


async def keep_authenticated(
    injector: CommandInjector,
    auth: IamAuth,
    target: IamTarget,
    user: str,
    *,
    every: float = REAUTH_EVERY,
    retry: float = REAUTH_RETRY,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> None:
    """Forever (cancel it when the session ends): ``every`` seconds after the last
    successful AUTH, send ``AUTH user <fresh token>`` through ``injector``; when the
    session cannot take it now or the AUTH fails, try again after ``retry`` seconds."""
    wait = every
    while True:
        await sleep(wait)
        try:
            token = await auth.token(target, user)
        except IamError as exc:
            logger.warning("cannot renew IAM login of %s on %s: %s", user, target.cluster, exc)
            wait = retry
            continue
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

        def answered(ok: bool, done: asyncio.Future[bool] = done) -> None:
            if not done.done():
                done.set_result(ok)

        if not injector.inject((b"AUTH", user.encode(), token.encode()), answered):
            wait = retry
            continue
        if await done:
            wait = every
        else:
            auth.forget(target, user)
            logger.warning(
                "MemoryDB refused the renewed IAM login of %s on %s", user, target.cluster
            )
            wait = retry
