"""Logging a managed user in: which password, cached how long, and what to do on
``WRONGPASS``.

The agent logs in with AWSPREVIOUS when the secret has one (it is on the MemoryDB user
in every state of the rotation cycle), else AWSCURRENT (a user just set up has one
password). The password is cached per user until the shared record's
``applied_version`` changes, so an agent makes one Secrets Manager call per rotation,
not one per connection; reading the record is one KV get. On ``WRONGPASS`` the secret is
read afresh and the other password tried once (an agent may log in during the moment a
rotation lands).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from bus import Bus, BusError, leases, subjects
from bus.link import connected
from dbservice.managed.aws import ManagedAws, ManagedError, SecretVersion
from dbservice.managed.rotation import UserRef
from dbservice.managed.state import ManagedUser
from dbservice.upstream.auth import send_auth

logger = logging.getLogger(__name__)

RECORD_WAIT = 2.0
"""Longest wait for a managed user's record before a login uses the cached password."""


class LoginRefused(Exception):
    """The managed login failed; ``str()`` is one line for the person (no secret)."""


@dataclass
class _Cached:
    version: str
    """The record's ``applied_version`` when this was read."""
    secret: SecretVersion = field(repr=False)


class ManagedPasswords:
    """The passwords one agent logs its sessions in with."""

    def __init__(self, bus: Bus, aws_for: Callable[[UserRef], ManagedAws]) -> None:
        self.bus = bus
        self.aws_for = aws_for
        self._cache: dict[str, _Cached] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.fetches = 0
        """GetSecretValue calls made for logins."""
        self.retries = 0
        """Logins that needed the other password after WRONGPASS."""

    def forget(self, key: str) -> None:
        self._cache.pop(key, None)

    async def _version(self, ref: UserRef) -> str:
        """The record's ``applied_version``; while NATS is away (not connected, or no
        answer within :data:`RECORD_WAIT`), that of the password cached, so a cut-off
        agent logs sessions in without waiting for NATS on each."""
        cached = self._cache.get(ref.key)
        if not connected(self.bus):
            return cached.version if cached is not None else ""
        try:
            async with asyncio.timeout(RECORD_WAIT):
                found = await leases.read(self.bus, subjects.LEASES_BUCKET, ref.key, ManagedUser)
        except (BusError, TimeoutError) as exc:
            logger.warning(
                "managed user %s: cannot read its record (%s)", ref.user, str(exc) or "no answer"
            )
            return cached.version if cached is not None else ""
        return found.record.applied_version if found is not None else ""

    async def _get(self, ref: UserRef, stage: str) -> SecretVersion | None:
        self.fetches += 1
        try:
            return await self.aws_for(ref).get_version(ref.secret_name, stage)
        except ManagedError as exc:
            raise LoginRefused(
                f"cannot read the password of managed user {ref.user!r}: {exc}"
            ) from None

    async def password(self, ref: UserRef) -> SecretVersion:
        """AWSPREVIOUS (else AWSCURRENT), cached until the record's version changes."""
        version = await self._version(ref)
        cached = self._cache.get(ref.key)
        if cached is not None and cached.version == version:
            return cached.secret
        lock = self._locks.setdefault(ref.key, asyncio.Lock())
        async with lock:
            cached = self._cache.get(ref.key)
            if cached is not None and cached.version == version:
                return cached.secret
            found = await self._get(ref, "AWSPREVIOUS") or await self._get(ref, "AWSCURRENT")
            if found is None:
                raise LoginRefused(
                    f"managed user {ref.user!r} has no password yet: the agents set it up "
                    "within one rotation interval; try again shortly"
                )
            self._cache[ref.key] = _Cached(version, found)
            return found

    async def login(
        self, ref: UserRef, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """``AUTH <user> <password>`` on a fresh connection, the other password once
        after ``WRONGPASS``; :class:`LoginRefused` when neither works."""
        tried = await self.password(ref)
        reply = await send_auth(reader, writer, ref.user, tried.password)
        if reply == b"+OK":
            return
        if not reply.startswith(b"-WRONGPASS"):
            raise LoginRefused(
                f"MemoryDB refused managed user {ref.user!r}: "
                f"{reply[1:200].decode(errors='replace')}"
            )
        self.retries += 1
        version = self._cache[ref.key].version if ref.key in self._cache else ""
        other = await self._get(ref, "AWSPREVIOUS")
        if other is None or other.version_id == tried.version_id:
            other = await self._get(ref, "AWSCURRENT")
        if other is not None and other.version_id != tried.version_id:
            reply = await send_auth(reader, writer, ref.user, other.password)
            if reply == b"+OK":
                self._cache[ref.key] = _Cached(version, other)
                return
        self.forget(ref.key)
        logger.warning(
            "managed user %s: MemoryDB refused both passwords of %s; the next rotation "
            "cycle repairs the user",
            ref.user,
            ref.secret_name,
        )
        raise LoginRefused(
            f"MemoryDB refused the managed password of {ref.user!r} (the user and its secret "
            "disagree; the agents repair that at the next rotation): try again shortly"
        )
