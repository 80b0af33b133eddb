"""AWS for the sandbox and the tests: moto's real HTTP server behind a small HTTP layer
of ours, both on loopback ports, reached by every client through the standard
``AWS_ENDPOINT_URL``.

moto is used only through what it documents: :class:`moto.server.ThreadedMotoServer`
and its HTTP API (the AWS wire protocols and ``/moto-api/reset``). What moto lacks for
MemoryDB is answered by :class:`AwsFront`, a WSGI application in front of it, from the
requests and responses on the wire, so a new moto release cannot change it silently:

- MemoryDB's list calls page the way AWS does (``MaxResults``/``NextToken``, 100
  records a page by default): the front reads moto's whole list and cuts the page;
- ACL membership: ``ACLNames`` of DescribeUsers and the whole of ``DescribeACLs`` come
  from :data:`ACL_MEMBERS` (the sandbox's and the tests' configuration);
- passwords: CreateUser/UpdateUser with more than two passwords are refused as MemoryDB
  refuses them; the passwords last set are kept per user (:data:`USER_PASSWORDS`) and
  :func:`on_user_change` listeners are told (the stand-in follows them onto valkey);
- STS: the keys AssumeRole hands out are remembered with the role and external id they
  were issued for (:func:`assumed_role`), so the stand-in can check IAM tokens signed
  with them.

Everything else passes to moto unchanged. Nothing in fleetgate's own code knows it
talks to moto.
"""

from __future__ import annotations

import http.client
import json
import os
import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qsl, urlsplit
from urllib.request import Request, urlopen

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIEnvironment

DEFAULT_PAGE_SIZE: Final = 100

ACL_MEMBERS: dict[tuple[str, str, str], set[str]] = {}
"""(account id, region, user name) -> ACL names the user belongs to (moto keeps none)."""

USER_PASSWORDS: dict[tuple[str, str, str], tuple[str, ...]] = {}
"""(account id, region, user name) -> the passwords CreateUser/UpdateUser last set."""
MAX_PASSWORDS: Final = 2
"""MemoryDB keeps at most two passwords per user."""


@dataclass(frozen=True)
class AssumedRole:
    """What STS AssumeRole handed out, read off the wire."""

    access_key_id: str
    secret_access_key: str
    role_arn: str
    external_id: str | None


_assumed: dict[str, AssumedRole] = {}
_state_lock = threading.Lock()

UserChange = Callable[[str, str, str, str, tuple[str, ...]], None]
"""(account id, region, user name, authentication type, passwords) after a change."""
_listeners: list[UserChange] = []


def on_user_change(listener: UserChange) -> Callable[[], None]:
    """Call ``listener`` (from the front's request thread) after each CreateUser/UpdateUser
    that sets an authentication mode; returns the function that unsubscribes it."""
    with _state_lock:
        _listeners.append(listener)

    def remove() -> None:
        with _state_lock:
            if listener in _listeners:
                _listeners.remove(listener)

    return remove


def assumed_role(access_key_id: str) -> AssumedRole | None:
    """The role an AssumeRole answered with ``access_key_id``, if the front saw it."""
    with _state_lock:
        return _assumed.get(access_key_id)


def assumed_roles() -> list[AssumedRole]:
    """Every AssumeRole answer the front has seen since the last reset, oldest first."""
    with _state_lock:
        return list(_assumed.values())


def acl_members(account: str, region: str, acl_name: str) -> set[str]:
    """The users of ACL ``acl_name`` according to :data:`ACL_MEMBERS` (the sandbox's and
    the tests' configuration of ACL membership)."""
    return {
        user
        for (acct, reg, user), acls in list(ACL_MEMBERS.items())
        if acct == account and reg == region and acl_name in acls
    }


class SandboxAclMembership:
    """ACL membership for the agents' managed users read from :data:`ACL_MEMBERS` (the
    stand-in's configuration), for ``dbservice.managed.membership.AclMembership``."""

    async def members(self, aws: Any, *, account: str, acl_name: str, users: Any) -> set[str]:
        return acl_members(account, str(aws.region), acl_name)


def _forget_everything() -> None:
    with _state_lock:
        _assumed.clear()
    ACL_MEMBERS.clear()
    USER_PASSWORDS.clear()


# -- the HTTP layer -------------------------------------------------------------------

_HOP_BY_HOP: Final = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "content-length", "te", "trailer"}
)
_MEMORYDB_TARGET: Final = "AmazonMemoryDB."
_JSON: Final = "application/x-amz-json-1.1"
_LISTS: Final = {
    "DescribeClusters": "Clusters",
    "DescribeSubnetGroups": "SubnetGroups",
    "DescribeUsers": "Users",
}
_STS_NS: Final = "{https://sts.amazonaws.com/doc/2011-06-15/}"


@dataclass
class Reply:
    """One HTTP answer, from moto or from the front itself."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def json(self) -> dict[str, Any]:
        data = json.loads(self.body or b"{}")
        return data if isinstance(data, dict) else {}

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


class AwsError(Exception):
    """An error answered the way a JSON-protocol AWS service answers it."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.status = status

    def reply(self) -> Reply:
        body = json.dumps({"__type": self.code, "message": str(self)}).encode()
        return Reply(self.status, [("Content-Type", _JSON), ("x-amzn-ErrorType", self.code)], body)


def _json_reply(data: dict[str, Any]) -> Reply:
    return Reply(200, [("Content-Type", _JSON)], json.dumps(data).encode())


def _arn_key(arn: str, name: str) -> tuple[str, str, str] | None:
    """(account, region, name) of a MemoryDB ARN, None when it is not one."""
    parts = arn.split(":")
    if len(parts) < 6 or parts[2] != "memorydb":
        return None
    return parts[4], parts[3], name


class AwsFront:
    """The WSGI application in front of moto (see the module docstring)."""

    def __init__(self, upstream: tuple[str, int], *, page_size: int = DEFAULT_PAGE_SIZE) -> None:
        self.upstream = upstream
        self.page_size = page_size

    # WSGI entry point
    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        method = str(environ.get("REQUEST_METHOD", "GET"))
        path = str(environ.get("PATH_INFO", "/")) or "/"
        query = str(environ.get("QUERY_STRING", ""))
        target = f"{path}?{query}" if query else path
        headers = self._headers(environ)
        body = self._body(environ)
        try:
            reply = self.handle(method, target, headers, body)
        except AwsError as exc:
            reply = exc.reply()
        reason = http.client.responses.get(reply.status, "")
        out = [(k, v) for k, v in reply.headers if k.lower() not in _HOP_BY_HOP]
        out.append(("Content-Length", str(len(reply.body))))
        start_response(f"{reply.status} {reason}", out)
        return [reply.body]

    @staticmethod
    def _headers(environ: WSGIEnvironment) -> dict[str, str]:
        headers: dict[str, str] = {}
        for key, value in environ.items():
            if key.startswith("HTTP_"):
                headers[key[5:].replace("_", "-").title()] = str(value)
        for key, name in (("CONTENT_TYPE", "Content-Type"), ("CONTENT_LENGTH", "Content-Length")):
            if environ.get(key):
                headers[name] = str(environ[key])
        return headers

    @staticmethod
    def _body(environ: WSGIEnvironment) -> bytes:
        stream = environ["wsgi.input"]
        if environ.get("wsgi.input_terminated"):
            return bytes(stream.read())
        length = int(environ.get("CONTENT_LENGTH") or 0)
        return bytes(stream.read(length)) if length > 0 else b""

    def forward(self, method: str, target: str, headers: dict[str, str], body: bytes) -> Reply:
        """The request as it is, to moto."""
        conn = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            sent = {k: v for k, v in headers.items() if k.lower() not in _HOP_BY_HOP}
            sent["Content-Length"] = str(len(body))
            conn.request(method, target, body=body, headers=sent)
            response = conn.getresponse()
            return Reply(response.status, list(response.getheaders()), response.read())
        finally:
            conn.close()

    def handle(self, method: str, target: str, headers: dict[str, str], body: bytes) -> Reply:
        if method == "POST" and urlsplit(target).path == "/moto-api/reset":
            reply = self.forward(method, target, headers, body)
            _forget_everything()
            return reply
        amz_target = headers.get("X-Amz-Target", "")
        if amz_target.startswith(_MEMORYDB_TARGET):
            return self.memorydb(amz_target[len(_MEMORYDB_TARGET) :], target, headers, body)
        if method == "POST" and "/sts/" in headers.get("Authorization", ""):
            return self.sts(target, headers, body)
        return self.forward(method, target, headers, body)

    # -- MemoryDB -----------------------------------------------------------------------

    def memorydb(self, op: str, target: str, headers: dict[str, str], body: bytes) -> Reply:
        try:
            params = json.loads(body or b"{}")
        except ValueError:
            params = None
        if not isinstance(params, dict):
            return self.forward("POST", target, headers, body)
        if op in _LISTS:
            return self.listing(op, params, target, headers)
        if op == "DescribeACLs":
            return self.describe_acls(params, target, headers)
        if op in ("CreateUser", "UpdateUser"):
            return self.set_user(op, params, target, headers, body)
        if op == "DeleteUser":
            reply = self.forward("POST", target, headers, body)
            if reply.ok:
                user = reply.json().get("User") or {}
                key = _arn_key(str(user.get("ARN", "")), str(user.get("Name", "")))
                if key:
                    USER_PASSWORDS.pop(key, None)
            return reply
        return self.forward("POST", target, headers, body)

    def _call(self, op: str, params: dict[str, Any], target: str, headers: dict[str, str]) -> Reply:
        """MemoryDB ``op`` at moto with the caller's credentials."""
        sent = dict(headers)
        sent["X-Amz-Target"] = _MEMORYDB_TARGET + op
        return self.forward("POST", target, sent, json.dumps(params).encode())

    def _everything(
        self, op: str, params: dict[str, Any], target: str, headers: dict[str, str]
    ) -> list[Any] | Reply:
        """Every record moto lists for ``params`` (following moto's own pages, should it
        ever page), or moto's error reply."""
        field = _LISTS[op]
        query = {k: v for k, v in params.items() if k not in ("MaxResults", "NextToken")}
        found: list[Any] = []
        while True:
            reply = self._call(op, query, target, headers)
            if not reply.ok:
                return reply
            data = reply.json()
            found.extend(data.get(field) or [])
            token = data.get("NextToken")
            if not token:
                return found
            query["NextToken"] = token

    def listing(
        self, op: str, params: dict[str, Any], target: str, headers: dict[str, str]
    ) -> Reply:
        size = params.get("MaxResults") or self.page_size
        token = params.get("NextToken") or "0"
        if not isinstance(size, int) or size < 1:
            raise AwsError("InvalidParameterValueException", f"MaxResults {size!r} is not valid.")
        if not (isinstance(token, str) and token.isdigit()):
            raise AwsError("InvalidParameterValueException", "The NextToken is not valid.")
        found = self._everything(op, params, target, headers)
        if isinstance(found, Reply):
            return found
        if op == "DescribeUsers":
            found = [self._with_acls(user) for user in found]
        start = int(token)
        end = start + size
        out: dict[str, Any] = {_LISTS[op]: found[start:end]}
        if end < len(found):
            out["NextToken"] = str(end)
        return _json_reply(out)

    @staticmethod
    def _with_acls(user: Any) -> Any:
        if not isinstance(user, dict):
            return user
        key = _arn_key(str(user.get("ARN", "")), str(user.get("Name", "")))
        if key is None:
            return user
        kept = set(user.get("ACLNames") or ()) | ACL_MEMBERS.get(key, set())
        return {**user, "ACLNames": sorted(kept)}

    def describe_acls(self, params: dict[str, Any], target: str, headers: dict[str, str]) -> Reply:
        """Every ACL some user of the caller's region belongs to (moto's own ACL names
        joined with :data:`ACL_MEMBERS`), with its users."""
        found = self._everything("DescribeUsers", {}, target, headers)
        if isinstance(found, Reply):
            return found
        members: dict[str, set[str]] = {}
        account = region = ""
        for user in map(self._with_acls, found):
            if not isinstance(user, dict):
                continue
            key = _arn_key(str(user.get("ARN", "")), str(user.get("Name", "")))
            if key is None:
                continue
            account, region, name = key
            for acl in user.get("ACLNames") or ():
                members.setdefault(str(acl), set()).add(name)
        wanted = params.get("ACLName")
        acls = [
            {
                "Name": name,
                "Status": "active",
                "UserNames": sorted(users),
                "ARN": f"arn:aws:memorydb:{region}:{account}:acl/{name}",
            }
            for name, users in sorted(members.items())
            if wanted in (None, name)
        ]
        if wanted and not acls:
            raise AwsError("ACLNotFoundFault", f"ACL {wanted} not found.")
        return _json_reply({"ACLs": acls})

    def set_user(
        self, op: str, params: dict[str, Any], target: str, headers: dict[str, str], body: bytes
    ) -> Reply:
        mode = params.get("AuthenticationMode")
        if op == "UpdateUser" and mode is None:
            return self.forward("POST", target, headers, body)
        mode = mode if isinstance(mode, dict) else {}
        kind = str(mode.get("Type", "password"))
        passwords = tuple(str(p) for p in mode.get("Passwords") or ())
        if kind == "password" and not 1 <= len(passwords) <= MAX_PASSWORDS:
            raise AwsError(
                "InvalidParameterValueException",
                f"A password user needs 1 to {MAX_PASSWORDS} passwords, not {len(passwords)}.",
            )
        reply = self.forward("POST", target, headers, body)
        if not reply.ok:
            return reply
        user = reply.json().get("User") or {}
        key = _arn_key(str(user.get("ARN", "")), str(user.get("Name", "")))
        if key is None:
            return reply
        kept = passwords if kind == "password" else ()
        USER_PASSWORDS[key] = kept
        with _state_lock:
            listeners = list(_listeners)
        for listener in listeners:
            listener(*key, kind, kept)
        return reply

    # -- STS ----------------------------------------------------------------------------

    def sts(self, target: str, headers: dict[str, str], body: bytes) -> Reply:
        reply = self.forward("POST", target, headers, body)
        params = dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
        if not reply.ok or params.get("Action") != "AssumeRole":
            return reply
        try:
            root = ET.fromstring(reply.body)
        except ET.ParseError:
            return reply
        creds = root.find(f".//{_STS_NS}Credentials")
        if creds is None:
            return reply
        key = creds.findtext(f"{_STS_NS}AccessKeyId")
        secret = creds.findtext(f"{_STS_NS}SecretAccessKey")
        if key and secret:
            role = AssumedRole(key, secret, params.get("RoleArn", ""), params.get("ExternalId"))
            with _state_lock:
                _assumed[key] = role
        return reply


class MotoServer:
    """moto's ThreadedMotoServer on a loopback port, behind :class:`AwsFront` on another;
    :attr:`url` is the front's."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        try:
            from moto.server import ThreadedMotoServer
        except ImportError as exc:
            raise ImportError(
                f"the sandbox's AWS needs moto's server ({exc}); "
                "install it with: pip install 'fleetgate[sandbox]'"
            ) from exc

        self._moto = ThreadedMotoServer(ip_address=host, port=0, verbose=False)
        self._host, self._port = host, port
        self._front: Any = None
        self._thread: threading.Thread | None = None
        self.url = ""

    def start(self) -> MotoServer:
        from werkzeug.serving import make_server

        self._moto.start()
        front = AwsFront(self._moto.get_host_and_port())
        self._front = make_server(self._host, self._port, front, threaded=True)
        self._thread = threading.Thread(
            target=self._front.serve_forever, name="aws-front", daemon=True
        )
        self._thread.start()
        host, port = self._front.server_address[:2]
        self.url = f"http://{host}:{port}"
        return self

    def stop(self) -> None:
        if self._front is not None:
            self._front.shutdown()
            self._front.server_close()
            self._front = None
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._moto.stop()

    def reset(self) -> None:
        """Forget every resource (moto's reset API), every ACL membership, password and
        assumed role."""
        urlopen(Request(f"{self.url}/moto-api/reset", method="POST"), timeout=10).close()

    def environ(self) -> dict[str, str]:
        """Environment for processes that should use this server as AWS."""
        return {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": "AKIAFLEETGATESANDBOX",
            "AWS_SECRET_ACCESS_KEY": "sandbox-secret-key",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }


@contextmanager
def moto_environ(server: MotoServer) -> Iterator[dict[str, str]]:
    """Set :meth:`MotoServer.environ` in ``os.environ`` for the duration (restored after)."""
    saved = {k: os.environ.get(k) for k in [*server.environ(), "AWS_PROFILE"]}
    os.environ.pop("AWS_PROFILE", None)
    os.environ.update(server.environ())
    try:
        yield server.environ()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
