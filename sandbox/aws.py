"""AWS for the sandbox and the tests: moto's real HTTP server, started in-process on a
loopback port, reached by every client through the standard ``AWS_ENDPOINT_URL``.

moto answers MemoryDB's list calls in one page and keeps no ACL membership. Real AWS
pages (``MaxResults``/``NextToken``), and fleetgate must page to the end, so
:func:`install_moto_extensions` teaches moto's MemoryDB responses to page the way AWS
does (100 records a page by default) and to report ``ACLNames`` from
:data:`ACL_MEMBERS`. moto also drops the passwords of CreateUser/UpdateUser and accepts
any number of them: the extensions keep them (:data:`USER_PASSWORDS`), refuse more than
two as MemoryDB does, answer ``DescribeACLs`` from :data:`ACL_MEMBERS`, and tell
:func:`on_user_change` listeners (the stand-in follows them onto valkey). Nothing in
fleetgate's own code knows it talks to moto.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.request import Request, urlopen

DEFAULT_PAGE_SIZE = 100

ACL_MEMBERS: dict[tuple[str, str, str], set[str]] = {}
"""(account id, region, user name) -> ACL names the user belongs to (moto keeps none)."""

USER_PASSWORDS: dict[tuple[str, str, str], tuple[str, ...]] = {}
"""(account id, region, user name) -> the passwords CreateUser/UpdateUser last set."""
MAX_PASSWORDS = 2
"""MemoryDB keeps at most two passwords per user."""

UserChange = Callable[[str, str, str, str, tuple[str, ...]], None]
"""(account id, region, user name, authentication type, passwords) after a change."""
_listeners: list[UserChange] = []
_listeners_lock = threading.Lock()


def on_user_change(listener: UserChange) -> Callable[[], None]:
    """Call ``listener`` (from moto's thread) after each CreateUser/UpdateUser that sets
    an authentication mode; returns the function that unsubscribes it."""
    with _listeners_lock:
        _listeners.append(listener)

    def remove() -> None:
        with _listeners_lock:
            if listener in _listeners:
                _listeners.remove(listener)

    return remove


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


_installed = threading.Lock()
_done = False


def _page(items: Sequence[Any], params: dict[str, Any]) -> tuple[Sequence[Any], str | None]:
    size = int(params.get("MaxResults") or DEFAULT_PAGE_SIZE)
    start = int(params.get("NextToken") or 0)
    end = start + size
    return items[start:end], (str(end) if end < len(items) else None)


def install_moto_extensions() -> None:
    """Patch moto's MemoryDB responses to page like AWS and to report ACL membership."""
    global _done
    with _installed:
        if _done:
            return
        from moto.core.responses import ActionResult
        from moto.memorydb.exceptions import InvalidParameterValueException
        from moto.memorydb.models import MemoryDBUser
        from moto.memorydb.responses import MemoryDBResponse

        def describe_clusters(self: MemoryDBResponse) -> ActionResult:
            params = json.loads(self.body)
            found = self.memorydb_backend.describe_clusters(cluster_name=params.get("ClusterName"))
            page, token = _page(found, params)
            detail = bool(params.get("ShowShardDetails"))
            out: dict[str, Any] = {
                "Clusters": [c.to_desc_dict() if detail else c.to_dict() for c in page]
            }
            if token:
                out["NextToken"] = token
            return ActionResult(out)

        def describe_subnet_groups(self: MemoryDBResponse) -> ActionResult:
            params = json.loads(self.body)
            found = self.memorydb_backend.describe_subnet_groups(
                subnet_group_name=params.get("SubnetGroupName")
            )
            page, token = _page(found, params)
            out: dict[str, Any] = {"SubnetGroups": [g.to_dict() for g in page]}
            if token:
                out["NextToken"] = token
            return ActionResult(out)

        def describe_users(self: MemoryDBResponse) -> ActionResult:
            params = json.loads(self.body)
            found = self.memorydb_backend.describe_users(
                user_name=params.get("UserName"), filters=params.get("Filters")
            )
            page, token = _page(found, params)
            out: dict[str, Any] = {"Users": [u.to_dict() for u in page]}
            if token:
                out["NextToken"] = token
            return ActionResult(out)

        original_user_to_dict = MemoryDBUser.to_dict

        def user_to_dict(self: MemoryDBUser) -> dict[str, Any]:
            out: dict[str, Any] = original_user_to_dict(self)
            arn = str(out.get("ARN", ""))
            parts = arn.split(":")
            if len(parts) >= 5:
                key = (parts[4], parts[3], str(out.get("Name", "")))
                out["ACLNames"] = sorted(ACL_MEMBERS.get(key, set()))
            return out

        original_set_authentication = MemoryDBUser.set_authentication

        def set_authentication(self: MemoryDBUser, authentication_mode: dict[str, Any]) -> None:
            mode = authentication_mode or {}
            kind = str(mode.get("Type", "password"))
            passwords = tuple(str(p) for p in mode.get("Passwords") or ())
            if kind == "password" and not 1 <= len(passwords) <= MAX_PASSWORDS:
                raise InvalidParameterValueException(
                    f"A password user needs 1 to {MAX_PASSWORDS} passwords, not {len(passwords)}."
                )
            original_set_authentication(self, authentication_mode)
            parts = self.arn.split(":")
            key = (parts[4], parts[3], self.user_name)
            USER_PASSWORDS[key] = passwords if kind == "password" else ()
            with _listeners_lock:
                listeners = list(_listeners)
            for listener in listeners:
                listener(*key, kind, USER_PASSWORDS[key])

        def describe_acls(self: MemoryDBResponse) -> ActionResult:
            params = json.loads(self.body)
            backend = self.memorydb_backend
            names = {
                acl
                for (acct, region, _), acls in list(ACL_MEMBERS.items())
                if acct == backend.account_id and region == backend.region_name
                for acl in acls
            }
            wanted = params.get("ACLName")
            account, region = backend.account_id, backend.region_name
            acls = [
                {
                    "Name": name,
                    "Status": "active",
                    "UserNames": sorted(acl_members(account, region, name)),
                    "ARN": f"arn:aws:memorydb:{region}:{account}:acl/{name}",
                }
                for name in sorted(names)
                if wanted in (None, name)
            ]
            if wanted and not acls:
                from moto.memorydb.exceptions import MemoryDBClientError

                raise MemoryDBClientError("ACLNotFoundFault", f"ACL {wanted} not found.")
            return ActionResult({"ACLs": acls})

        MemoryDBUser.set_authentication = set_authentication  # type: ignore[method-assign]
        MemoryDBResponse.describe_ac_ls = describe_acls  # type: ignore[attr-defined]  # moto's name for DescribeACLs
        MemoryDBResponse.describe_clusters = describe_clusters  # type: ignore[method-assign]
        MemoryDBResponse.describe_subnet_groups = describe_subnet_groups  # type: ignore[method-assign]
        MemoryDBResponse.describe_users = describe_users  # type: ignore[method-assign]
        MemoryDBUser.to_dict = user_to_dict  # type: ignore[method-assign]
        _done = True


class MotoServer:
    """moto's ThreadedMotoServer on a loopback port, with the MemoryDB extensions."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        from moto.server import ThreadedMotoServer

        install_moto_extensions()
        self._server = ThreadedMotoServer(ip_address=host, port=port, verbose=False)
        self.url = ""

    def start(self) -> MotoServer:
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.url = f"http://{host}:{port}"
        return self

    def stop(self) -> None:
        self._server.stop()

    def reset(self) -> None:
        """Forget every resource (moto's reset API) and every ACL membership."""
        urlopen(Request(f"{self.url}/moto-api/reset", method="POST"), timeout=10).close()
        ACL_MEMBERS.clear()
        USER_PASSWORDS.clear()

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
