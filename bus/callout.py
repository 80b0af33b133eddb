"""The auth service's side of NATS auth callout: answer ``$SYS.REQ.USER.AUTH``.

nats-server publishes an authorization request there for each connection whose user
is not one of the config's ``auth_users``; whatever answers (a signed authorization
response, :mod:`dbservice.auth.natsrights`) decides the connection. Several auth service
instances share the requests through one queue group.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Final

import nats.aio.msg
import nats.aio.subscription

from bus.client import Bus

logger = logging.getLogger(__name__)

REQUEST_SUBJECT: Final = "$SYS.REQ.USER.AUTH"
QUEUE: Final = "fleetgate-auth-callout"

Answer = Callable[[bytes], bytes | Awaitable[bytes | None] | None]
"""A request's bytes -> the response to send (None: send nothing, the server times out);
a coroutine function too (an answer that reads the bus first)."""


async def serve_callout(bus: Bus, answer: Answer) -> nats.aio.subscription.Subscription:
    """Answer authorization requests on ``bus`` until the subscription is removed."""

    async def on_request(msg: nats.aio.msg.Msg) -> None:
        try:
            response = answer(msg.data)
            if inspect.isawaitable(response):
                response = await response
        except Exception:  # one bad request never stops the responder
            logger.exception("auth callout: could not answer a request")
            return
        if response is not None and msg.reply:
            await msg.respond(response)

    sub = await bus.nc.subscribe(REQUEST_SUBJECT, queue=QUEUE, cb=on_request)
    await bus.nc.flush()
    return sub
