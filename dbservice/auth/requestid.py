"""Each request to the auth service gets an id: the caller's ``X-Request-Id`` when it is
sane (1 to 128 characters of letters, digits and ``-._:``, as proxies and tracing
systems make them), else a new one (32 hex digits). The id is in the log context while
the request is served (so every JSON log line about it carries ``request_id``, beside
``client_addr``), and in the answer's ``X-Request-Id`` header, errors included, so a
person can quote it and an operator find the lines."""

from __future__ import annotations

import re
import uuid
from typing import Any, Final

from aiohttp import web

from fleetgate.logs import bound_context

HEADER: Final = "X-Request-Id"
_SANE: Final = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def request_id(incoming: str | None) -> str:
    """``incoming`` when it is a sane request id, else a new one."""
    if incoming is not None and _SANE.fullmatch(incoming):
        return incoming
    return uuid.uuid4().hex


@web.middleware
async def request_ids(request: web.Request, handler: Any) -> web.StreamResponse:
    """The middleware (put it first: the others' answers and log lines get the id too)."""
    rid = request_id(request.headers.get(HEADER))
    with bound_context(request_id=rid, client_addr=request.remote or ""):
        try:
            response: web.StreamResponse = await handler(request)
        except web.HTTPException as exc:
            exc.headers[HEADER] = rid
            raise
        if not response.prepared:
            response.headers[HEADER] = rid
        return response
