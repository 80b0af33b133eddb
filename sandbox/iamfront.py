"""The stand-in learns MemoryDB's login: ACL users from moto's DescribeUsers, IAM tokens
checked by recomputing their SigV4 signature.

:class:`MemoryDBLogin` holds what the fronts check against: the cluster name and region,
the users (synced from moto's ``DescribeUsers`` by :meth:`MemoryDBLogin.sync`, which
also applies them as valkey ACL users on every node) and how to find the secret key of
an access key (the sandbox's own credentials, and roles assumed through moto's STS).

:class:`IamFront` is the TLS front of every node and of the configuration endpoint. On
each ``AUTH <user> <token>`` (or ``HELLO <v> AUTH <user> <token>``) for an IAM user the
token is verified here and replaced by that user's internal valkey password; a password
user's ``AUTH`` goes to valkey unchanged, which checks it against its own ACL. A wrong,
expired or foreign token is refused the way MemoryDB refuses it (``WRONGPASS``). The
signature is recomputed by hand (hashlib/hmac, following the SigV4 specification) rather
than by botocore, so it is an independent check of the tokens fleetgate makes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import secrets
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final
from urllib.parse import parse_qsl, quote

from fleetgate.resp import encode_command
from sandbox.tlsfront import Address, TLSFront
from sandbox.valkeynode import ValkeyNode

log = logging.getLogger(__name__)

WRONGPASS: Final = "WRONGPASS invalid username-password pair or user is disabled."
"""MemoryDB's refusal of a login (valkey's too, which answers it here)."""
MAX_EXPIRES: Final = 900
CLOCK_SKEW: Final = timedelta(minutes=5)
SANDBOX_KEYS: Final = {"AKIAFLEETGATESANDBOX": "sandbox-secret-key"}
"""The sandbox's own credentials (sandbox.aws.MotoServer.environ)."""
MAX_ARGS: Final = 1024 * 1024
MAX_BULK: Final = 512 * 1024 * 1024


@dataclass
class AclUser:
    name: str
    type: str
    """``iam`` or ``password`` (``no-password`` users need no AUTH)."""
    access_string: str = "on ~* &* +@all"
    passwords: tuple[str, ...] = ()
    internal: str = field(default_factory=lambda: secrets.token_hex(16))
    """The valkey password an IAM user is logged in with once its token checks out."""


def moto_secret(access_key: str) -> str | None:
    """The secret of a key STS AssumeRole handed out through the sandbox's AWS front
    (same process only)."""
    from sandbox.aws import assumed_role

    role = assumed_role(access_key)
    return role.secret_access_key if role else None


def default_secret(access_key: str) -> str | None:
    return SANDBOX_KEYS.get(access_key) or moto_secret(access_key)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def _encode(value: str) -> str:
    return quote(value, safe="-_.~")


def check_token(
    token: str,
    *,
    user: str,
    cluster: str,
    region: str,
    secret_of: Callable[[str], str | None],
    now: datetime | None = None,
) -> str | None:
    """None when ``token`` is a valid IAM token of ``user`` for ``cluster``, else why not
    (for the log; the client only ever sees WRONGPASS)."""
    host, sep, rest = token.partition("/?")
    if not sep:
        return "not a presigned URL"
    if host != cluster.lower():
        return f"signed for host {host!r}, not {cluster.lower()!r}"
    pairs = parse_qsl(rest, keep_blank_values=True, strict_parsing=False)
    params = dict(pairs)
    if len(params) != len(pairs):
        return "repeated query parameter"
    if params.get("Action") != "connect" or params.get("User") != user:
        return "Action/User do not match"
    if params.get("X-Amz-Algorithm") != "AWS4-HMAC-SHA256":
        return "not SigV4"
    if params.get("X-Amz-SignedHeaders") != "host":
        return "signed headers are not just host"
    try:
        key_id, day, scope_region, service, terminal = params["X-Amz-Credential"].split("/")
        stamp = params["X-Amz-Date"]
        signed_at = datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        expires = int(params["X-Amz-Expires"])
        signature = params["X-Amz-Signature"]
    except (KeyError, ValueError):
        return "missing or malformed signing parameters"
    if (scope_region, service, terminal) != (region, "memorydb", "aws4_request"):
        return f"scope {scope_region}/{service} is not {region}/memorydb"
    if day != stamp[:8]:
        return "credential date differs from X-Amz-Date"
    if not 0 < expires <= MAX_EXPIRES:
        return f"X-Amz-Expires {expires} out of range"
    moment = now or datetime.now(UTC)
    if moment > signed_at + timedelta(seconds=expires):
        return "expired"
    if signed_at > moment + CLOCK_SKEW:
        return "signed in the future"
    secret = secret_of(key_id)
    if secret is None:
        return f"unknown access key {key_id}"
    query = "&".join(
        f"{_encode(k)}={_encode(v)}"
        for k, v in sorted((k, v) for k, v in pairs if k != "X-Amz-Signature")
    )
    canonical = "\n".join(["GET", "/", query, f"host:{host}", "", "host", _sha256(b"")])
    scope = f"{day}/{region}/memorydb/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", stamp, scope, _sha256(canonical.encode())])
    key = _hmac(f"AWS4{secret}".encode(), day)
    for part in (region, "memorydb", "aws4_request"):
        key = _hmac(key, part)
    expected = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, signature):
        return "signature does not match"
    return None


class MemoryDBLogin:
    """The ACL users of one stand-in cluster and how their logins are checked."""

    def __init__(
        self,
        *,
        cluster: str,
        region: str = "us-east-1",
        secret_of: Callable[[str], str | None] = default_secret,
        allow_connect: Callable[[str, str], bool] = lambda access_key, user: True,
    ) -> None:
        self.cluster = cluster
        self.region = region
        self.secret_of = secret_of
        self.allow_connect = allow_connect
        """(access key, user) -> may it connect; False plays a missing memorydb:Connect."""
        self.users: dict[str, AclUser] = {}
        self.refusals: list[str] = []
        """Why each refused token was refused (for tests and the sandbox log)."""
        self.accepted = 0
        self.changes: list[tuple[str, str, int]] = []
        """(user, type, password count) per user change applied by :meth:`follow_aws`."""
        self.max_passwords = 0
        """The most passwords any user had at once, as applied by :meth:`follow_aws`."""

    def set_users(self, users: Sequence[AclUser]) -> None:
        self.users = {u.name: u for u in users}

    def users_from_describe(self, reply: list[dict[str, Any]]) -> list[AclUser]:
        """ACL users from DescribeUsers' ``Users`` (IAM and password users)."""
        out: list[AclUser] = []
        for item in reply:
            kind = str(item.get("Authentication", {}).get("Type", ""))
            name = str(item.get("Name", ""))
            old = self.users.get(name)
            passwords = old.passwords if old is not None else ()
            user = AclUser(
                name=name,
                type=kind,
                access_string=str(item.get("AccessString") or "on ~* &* +@all"),
                passwords=passwords,
            )
            if old is not None and old.type == kind:
                user.internal = old.internal
            out.append(user)
        return out

    async def sync(self, describe: list[dict[str, Any]], nodes: Sequence[ValkeyNode]) -> None:
        """Take the users from a DescribeUsers reply (moto does not return passwords, so
        password users keep the ones given with :meth:`set_password`) and apply them as
        valkey ACL users on every running node."""
        self.set_users(self.users_from_describe(describe))
        for node in nodes:
            if node.running:
                await apply_acl(node, self.users.values())

    async def sync_from_aws(self, nodes: Sequence[ValkeyNode]) -> None:
        """:meth:`sync` with every page of DescribeUsers in the login's region, asked of
        whatever AWS the environment points at (moto in the sandbox and the tests)."""

        def describe() -> list[dict[str, Any]]:
            import boto3

            pages = boto3.client("memorydb", region_name=self.region).get_paginator(
                "describe_users"
            )
            return [user for page in pages.paginate() for user in page["Users"]]

        await self.sync(await asyncio.to_thread(describe), nodes)

    def follow_aws(self, nodes: Sequence[ValkeyNode], *, delay: float = 0.0) -> Callable[[], None]:
        """Apply every CreateUser/UpdateUser of this region that moto answers (through
        :func:`sandbox.aws.on_user_change`) to the valkey nodes, in order, ``delay``
        seconds later (MemoryDB, too, applies a user change a moment after the call).
        Password changes keep existing connections, as on MemoryDB. Call from the
        stand-in's loop; returns the function that stops following."""
        from sandbox.aws import on_user_change

        loop = asyncio.get_running_loop()
        lock = asyncio.Lock()
        tasks: set[asyncio.Task[None]] = set()

        async def apply(name: str, kind: str, passwords: tuple[str, ...]) -> None:
            if delay:
                await asyncio.sleep(delay)
            async with lock:
                user = self.users.get(name)
                if user is None or user.type != kind:
                    user = self.users[name] = AclUser(name=name, type=kind)
                    user.passwords = passwords
                    for node in nodes:
                        if node.running:
                            await apply_acl(node, [user])
                else:
                    user.passwords = passwords
                    rules = ["resetpass", *(f">{p}" for p in passwords)]
                    if kind == "password":
                        for node in nodes:
                            if node.running:
                                await node.command("ACL", "SETUSER", name, *rules)
                self.changes.append((name, kind, len(passwords)))
                self.max_passwords = max(self.max_passwords, len(passwords))

        def start(name: str, kind: str, passwords: tuple[str, ...]) -> None:
            task = loop.create_task(apply(name, kind, passwords))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        def changed(account: str, region: str, name: str, kind: str, pw: tuple[str, ...]) -> None:
            if region == self.region and not loop.is_closed():
                loop.call_soon_threadsafe(start, name, kind, pw)

        remove = on_user_change(changed)

        def stop() -> None:
            remove()
            for task in list(tasks):
                task.cancel()

        return stop

    def set_password(self, user: str, *passwords: str) -> None:
        if user not in self.users:
            self.users[user] = AclUser(name=user, type="password")
        self.users[user].passwords = passwords

    def check(self, user: str, token: str, *, now: datetime | None = None) -> AclUser | None:
        """The IAM user if ``token`` logs it in, else None (and the reason recorded)."""
        acl_user = self.users.get(user)
        reason: str | None
        if acl_user is None or acl_user.type != "iam":
            reason = "no such user" if acl_user is None else "not an IAM user"
        else:
            reason = check_token(
                token,
                user=user,
                cluster=self.cluster,
                region=self.region,
                secret_of=self.secret_of,
                now=now,
            )
            if reason is None:
                key_id = dict(parse_qsl(token.partition("?")[2]))["X-Amz-Credential"]
                if not self.allow_connect(key_id.split("/")[0], user):
                    reason = "memorydb:Connect not allowed"
        if reason is not None:
            self.refusals.append(reason)
            log.info("IAM login of %s refused: %s", user, reason)
            return None
        self.accepted += 1
        return acl_user


async def apply_acl(node: ValkeyNode, users: Sequence[AclUser] | Any) -> None:
    """Make ``users`` valkey ACL users of ``node`` (IAM users get their internal password)."""
    for user in users:
        rules = ["reset", *user.access_string.split()]
        if user.type == "iam":
            rules.append(f">{user.internal}")
        elif user.type == "no-password":
            rules.append("nopass")
        else:
            rules += [f">{p}" for p in user.passwords]
        await node.command("ACL", "SETUSER", user.name, *rules)


async def read_command(reader: asyncio.StreamReader) -> list[bytes] | bytes | None:
    """One RESP array of bulk strings (what clients send), the raw line of an inline
    command, or None at EOF."""
    line = await reader.readline()
    if not line:
        return None
    if not line.startswith(b"*"):
        return line
    count = int(line[1:].strip())
    if not 0 <= count <= MAX_ARGS:
        raise ValueError("too many arguments")
    args: list[bytes] = []
    for _ in range(count):
        head = await reader.readline()
        size = int(head[1:].strip())
        if not head.startswith(b"$") or not 0 <= size <= MAX_BULK:
            raise ValueError("bad bulk string")
        args.append((await reader.readexactly(size + 2))[:-2])
    return args


class IamFront(TLSFront):
    """A TLS front that checks IAM logins (see the module docstring). Build with
    :meth:`factory` for :class:`~sandbox.memorydb.StandinConfig.front_factory`.

    Every client command is read whole (the stand-in is for tests, not speed), so an
    ``AUTH`` later in a connection (a re-authentication before MemoryDB's 12-hour cut)
    is checked too. A refused token becomes an ``AUTH`` with a password nobody has, so
    valkey answers MemoryDB's very ``WRONGPASS`` line in its turn among pipelined replies.
    """

    def __init__(
        self,
        ssl_context: ssl.SSLContext,
        upstreams: Sequence[Address],
        *,
        login: MemoryDBLogin,
        host: str = "127.0.0.1",
        name: str = "front",
    ) -> None:
        super().__init__(ssl_context, upstreams, host=host, name=name)
        self.login = login

    @classmethod
    def factory(cls, login: MemoryDBLogin) -> Callable[..., TLSFront]:
        def build(
            ssl_context: ssl.SSLContext, upstreams: Sequence[Address], *, host: str, name: str
        ) -> TLSFront:
            return cls(ssl_context, upstreams, login=login, host=host, name=name)

        return build

    async def handle_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        upstream = await self.open_upstream()
        if upstream is None:
            return
        up_reader, up_writer = upstream
        replies = asyncio.create_task(self.pipe(up_reader, writer))
        try:
            while not replies.done():
                try:
                    command = await read_command(reader)
                except (ValueError, asyncio.IncompleteReadError):
                    break
                if command is None:
                    if up_writer.can_write_eof():
                        up_writer.write_eof()
                    await replies
                    break
                if isinstance(command, bytes):
                    up_writer.write(command)
                else:
                    up_writer.write(encode_command(self._rewrite(command)))
                await up_writer.drain()
        finally:
            replies.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await replies
            up_writer.transport.abort()

    def _rewrite(self, args: list[bytes]) -> list[bytes]:
        """The command to forward: an IAM user's token swapped for its internal password
        (a refused one for a password that fails); anything else unchanged."""
        name = args[0].upper() if args else b""
        if name == b"AUTH" and len(args) == 3:
            index = 2
        elif name == b"HELLO" and len(args) >= 5 and args[2].upper() == b"AUTH":
            index = 4
        else:
            return args
        user = args[index - 1].decode(errors="replace")
        acl_user = self.login.users.get(user)
        if acl_user is None or acl_user.type != "iam":
            return args  # a password user (or unknown): valkey's ACL decides
        checked = self.login.check(user, args[index].decode(errors="replace"))
        out = list(args)
        out[index] = (checked.internal if checked else "refused-" + secrets.token_hex(8)).encode()
        return out
