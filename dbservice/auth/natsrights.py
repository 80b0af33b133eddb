"""Each agent's own rights on the bus: NATS auth callout answered by the auth service.

nats-server (``authorization { auth_callout { ... } }`` in deploy/nats/*.conf) sends every
connection whose user is not one of the fleet's fixed users (``auth_users``) to
``$SYS.REQ.USER.AUTH`` as a signed *authorization request*; the auth service answers
with a user JWT signed by the callout issuer (an account NKey whose public key the
server trusts) carrying that agent's own permissions:

* heartbeats: only keys ending in its host_id (``$KV.fleetgate_db_servers.*.<host>``);
* audit events: only subjects ending in its host_id (``fleetgate.audit.<type>.<host>``),
  and readers check the event's ``host_id`` against that subject (:mod:`bus.audit`);
* managed-user records: the key filters it is given (all of them by default, see
  :class:`AgentAuthorizer`);
* reads: the registry, heartbeats, the CA, roles, managed-user records; never users,
  one-time codes or failed logins; replies only under its own inbox prefix.

An agent logs in as user ``agent-<host_id>`` with the password
:func:`nats_credentials_for` derives from the issuer seed (HMAC-SHA256): nothing per agent
is stored anywhere, any auth service instance with the seed can check any agent, and the
server config never lists agents. The join flow hands the agent this pair.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import nacl.exceptions
import nacl.signing
import nkeys

from bus import subjects
from bus.labels import Selector, matches
from bus.schemas import DatabaseResource
from bus.settings import AGENT_USER_PREFIX, inbox_prefix

REQUEST_AUDIENCE: Final = "nats-authorization-request"

_SECRET_CONTEXT: Final = b"fleetgate agent nats password v1"

DEFAULT_TTL: Final = 24 * 3600.0
"""How long a minted user JWT lasts: the server closes the connection then and the
agent's client reconnects, which asks the auth service again (a revoked agent is
refused then)."""

_HOST_ID_CHARS: Final = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_"
)


class CalloutError(ValueError):
    """An authorization request or credentials that cannot be accepted (the reason is
    sent back to nats-server, which logs it and refuses the connection)."""


@dataclass(frozen=True)
class NatsCredentials:
    """What an agent presents to NATS: ``nats://<user>:<password>@host:port``."""

    user: str
    password: str


def check_host_id(host_id: str) -> str:
    """``host_id`` if it can name an agent on the bus (one subject token, no escapes)."""
    if (
        not host_id
        or len(host_id) > 128
        or not set(host_id) <= _HOST_ID_CHARS
        or not host_id[0].isalnum()  # "_" names events without a host (audit_host_token)
    ):
        raise CalloutError(
            f"host_id {host_id[:140]!r}: expected 1-128 letters, digits, '-' or '_', "
            "starting with a letter or digit"
        )
    return host_id


def _issuer_pair(issuer_seed: bytes) -> nkeys.KeyPair:
    try:
        pair = nkeys.from_seed(bytearray(issuer_seed))
    except (nkeys.NkeysError, ValueError, binascii.Error) as exc:
        raise CalloutError(f"the callout issuer seed is not an NKey seed ({exc})") from None
    if not pair.public_key.startswith(b"A"):
        pair.wipe()
        raise CalloutError("the callout issuer seed must be an account seed (SA...)")
    return pair


def issuer_public_key(issuer_seed: bytes) -> str:
    """The public key nats-server's ``auth_callout { issuer: ... }`` names."""
    pair = _issuer_pair(issuer_seed)
    try:
        return str(pair.public_key.decode())
    finally:
        pair.wipe()


def new_issuer_seed() -> bytes:
    """A fresh callout issuer seed (an account NKey seed, ``SA...``)."""
    return bytes(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_ACCOUNT))


def nats_credentials_for(host_id: str, issuer_seed: bytes) -> NatsCredentials:
    """The NATS user and password of agent ``host_id`` (derived, not stored: the same
    for every call and every auth service instance holding ``issuer_seed``)."""
    check_host_id(host_id)
    key = hashlib.sha256(_SECRET_CONTEXT + b"\0" + issuer_seed).digest()
    mac = hmac.new(key, host_id.encode(), hashlib.sha256).digest()
    password = base64.urlsafe_b64encode(mac).rstrip(b"=").decode()
    return NatsCredentials(AGENT_USER_PREFIX + host_id, password)


# -- permissions ---------------------------------------------------------------------

_READ_BUCKETS: Final = (
    subjects.DATABASES_BUCKET,
    subjects.DB_SERVERS_BUCKET,
    subjects.AUTH_BUCKET,
    subjects.ROLES_BUCKET,
    subjects.LEASES_BUCKET,
)
_API_PREFIXES: Final = ("$JS.API.", "$JS.hub.API.")
"""Direct, and as a leaf node maps them to the hub's JetStream domain (leaf.conf)."""


def _reads(bucket: str) -> list[str]:
    stream = f"KV_{bucket}"
    return [
        f"STREAM.INFO.{stream}",
        f"CONSUMER.CREATE.{stream}",
        f"CONSUMER.CREATE.{stream}.>",
        f"CONSUMER.DELETE.{stream}.>",
        f"CONSUMER.INFO.{stream}.>",
        f"DIRECT.GET.{stream}",
        f"DIRECT.GET.{stream}.>",
        f"STREAM.MSG.GET.{stream}",
    ]


def agent_permissions(host_id: str, leases: Sequence[str] = (">",)) -> dict[str, Any]:
    """The ``pub``/``sub`` claims of agent ``host_id``'s user JWT: what the shared
    ``agent`` user of deploy/nats/permissions/agent.conf may do, with every write
    narrowed to this agent (``leases``: the managed-user key filters it may write)."""
    host = subjects.kv_token(check_host_id(host_id))
    api = ["INFO"]
    for bucket in _READ_BUCKETS:
        api += _reads(bucket)
    api += [
        f"STREAM.CREATE.KV_{subjects.DB_SERVERS_BUCKET}",
        f"STREAM.CREATE.KV_{subjects.LEASES_BUCKET}",
        f"STREAM.INFO.{subjects.AUDIT_STREAM}",
        f"STREAM.CREATE.{subjects.AUDIT_STREAM}",
    ]
    writes = [f"$KV.{subjects.DB_SERVERS_BUCKET}.*.{host}"]
    writes += [f"$KV.{subjects.LEASES_BUCKET}.{key}" for key in leases]
    publish = ["$JS.FC.>"]
    publish += [prefix + call for prefix in _API_PREFIXES for call in api]
    publish += writes + ["$JS.hub.API." + w for w in writes]
    # event types have two or three tokens (auth.login, db.session.start)
    publish += [
        f"{subjects.AUDIT_SUBJECT_PREFIX}.*.*.{host}",
        f"{subjects.AUDIT_SUBJECT_PREFIX}.*.*.*.{host}",
    ]
    inbox = inbox_prefix(AGENT_USER_PREFIX + host_id)
    return {"pub": {"allow": publish}, "sub": {"allow": [f"{inbox}.>"]}}


def lease_filters(databases: Iterable[DatabaseResource], selector: Selector | None) -> list[str]:
    """The managed-user key filters (``<region>.<account>.*`` of :data:`LEASES_BUCKET`)
    of the MemoryDB databases ``selector`` selects: what an agent admitted to serve only
    those databases (e.g. the labels of its join token) may write. None: every key (the
    agent is not limited to labels). Computed at login; databases added later count
    from the agent's next login (at most ``ttl`` later)."""
    if selector is None:
        return [">"]
    keys = {
        f"{subjects.kv_token(db.spec.aws.region)}.{subjects.kv_token(db.spec.aws.account_id)}.*"
        for db in databases
        if db.spec.aws is not None
        and db.spec.aws.memorydb is not None
        and db.spec.aws.region
        and db.spec.aws.account_id
        and matches(selector, db.metadata.labels)
    }
    return sorted(keys)


# -- JWTs ----------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def encode_jwt(claims: dict[str, Any], pair: nkeys.KeyPair) -> str:
    """A NATS JWT (``ed25519-nkey``) of ``claims`` signed by ``pair``."""
    body = {**claims, "iat": int(time.time()), "iss": pair.public_key.decode()}
    body["jti"] = _b64(hashlib.sha256(json.dumps(body, sort_keys=True).encode()).digest())
    header = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    payload = _b64(json.dumps(body).encode())
    signature = pair.sign(f"{header}.{payload}".encode())
    return f"{header}.{payload}.{_b64(signature)}"


def _public_key_bytes(public_key: str, prefix: int) -> bytes:
    try:
        raw = base64.b32decode(public_key + "=" * (-len(public_key) % 8))
    except (binascii.Error, ValueError):
        raise CalloutError(f"{public_key[:60]!r} is not an NKey") from None
    if len(raw) != 35 or raw[0] != prefix:
        raise CalloutError(f"{public_key[:60]!r} is not the right kind of NKey")
    if nkeys.crc16_checksum(raw[:33]) != raw[33:]:
        raise CalloutError(f"{public_key[:60]!r}: bad NKey checksum")
    return raw[1:33]


def decode_request(token: bytes, *, now: float | None = None) -> dict[str, Any]:
    """The claims of an authorization request, checked: signed by the server that sent
    it (its ``iss``, which must be the request's ``server_id``), for the callout, and
    not expired."""
    try:
        header, payload, signature = token.decode("ascii").strip().split(".")
        claims = json.loads(_unb64(payload))
        sig = _unb64(signature)
    except (UnicodeDecodeError, ValueError, binascii.Error):
        raise CalloutError("not an authorization request (a JWT)") from None
    if not isinstance(claims, dict) or not isinstance(claims.get("nats"), dict):
        raise CalloutError("not an authorization request (no nats claims)")
    nats = claims["nats"]
    issuer = str(claims.get("iss", ""))
    key = _public_key_bytes(issuer, nkeys.PREFIX_BYTE_SERVER)
    try:
        nacl.signing.VerifyKey(key).verify(f"{header}.{payload}".encode(), sig)
    except nacl.exceptions.BadSignatureError:
        raise CalloutError("authorization request: bad signature") from None
    if nats.get("type") != "authorization_request" or claims.get("aud") != REQUEST_AUDIENCE:
        raise CalloutError("not an authorization request (type or audience)")
    if (nats.get("server_id") or {}).get("id") != issuer:
        raise CalloutError("authorization request: signed by another server than it names")
    expires = claims.get("exp")
    if isinstance(expires, int) and expires < (now if now is not None else time.time()):
        raise CalloutError("authorization request expired")
    if not str(nats.get("user_nkey", "")).startswith("U"):
        raise CalloutError("authorization request: no user nkey")
    return claims


class AgentAuthorizer:
    """Answers nats-server's authorization requests for agents' connections.

    ``revoked(host_id)``: True refuses the agent (e.g. removed with ``agents rm``).
    ``leases(host_id)``: the managed-user key filters the agent may write (default
    every key: the managed-user records are not yet scoped per agent)."""

    def __init__(
        self,
        issuer_seed: bytes,
        *,
        ttl: float = DEFAULT_TTL,
        account: str = "$G",
        revoked: Callable[[str], bool] | None = None,
        leases: Callable[[str], Sequence[str]] | None = None,
    ) -> None:
        self._seed = bytes(issuer_seed)
        self.issuer = issuer_public_key(self._seed)
        self.ttl = ttl
        self.account = account
        self.revoked = revoked or (lambda _host: False)
        self.leases = leases or (lambda _host: (">",))

    def credentials(self, host_id: str) -> NatsCredentials:
        """The NATS login of agent ``host_id`` (what join and renew hand it)."""
        return nats_credentials_for(host_id, self._seed)

    def authorize(self, user: str, password: str) -> str:
        """The host_id of the agent these credentials belong to; CalloutError if none."""
        if not user.startswith(AGENT_USER_PREFIX):
            raise CalloutError(f"user {user[:80]!r} is not an agent (agent-<host_id>)")
        host_id = check_host_id(user[len(AGENT_USER_PREFIX) :])
        want = nats_credentials_for(host_id, self._seed).password
        if not hmac.compare_digest(want.encode(), password.encode()):
            raise CalloutError(f"agent {host_id}: wrong password")
        if self.revoked(host_id):
            raise CalloutError(f"agent {host_id}: revoked")
        return host_id

    def answer(self, request: bytes, *, now: float | None = None) -> tuple[bytes, str, str]:
        """The signed authorization response to one request, the agent's host_id (""
        when refused) and the refusal's reason ("" when admitted)."""
        claims = decode_request(request, now=now)
        nats = claims["nats"]
        user_nkey = str(nats["user_nkey"])
        server = str(nats["server_id"]["id"])
        opts = nats.get("connect_opts") or {}
        pair = _issuer_pair(self._seed)
        try:
            response: dict[str, Any] = {"type": "authorization_response", "version": 2}
            try:
                host_id = self.authorize(str(opts.get("user", "")), str(opts.get("pass", "")))
            except CalloutError as exc:
                host_id, reason = "", str(exc)
                response["error"] = reason
            else:
                reason = ""
                permissions = agent_permissions(host_id, self.leases(host_id))
                user_claims = {
                    "sub": user_nkey,
                    "aud": self.account,
                    "name": AGENT_USER_PREFIX + host_id,
                    "exp": int((now if now is not None else time.time()) + self.ttl),
                    "nats": {"type": "user", "version": 2, **permissions},
                }
                response["jwt"] = encode_jwt(user_claims, pair)
            outer = {"sub": user_nkey, "aud": server, "nats": response}
            return encode_jwt(outer, pair).encode(), host_id, reason
        finally:
            pair.wipe()
