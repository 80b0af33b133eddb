"""AWS for the sandbox and the tests: moto's real HTTP server, started in-process on a
loopback port, reached by every client through the standard ``AWS_ENDPOINT_URL``.

moto answers MemoryDB's list calls in one page and keeps no ACL membership. Real AWS
pages (``MaxResults``/``NextToken``), and fleetgate must page to the end, so
:func:`install_moto_extensions` teaches moto's MemoryDB responses to page the way AWS
does (100 records a page by default) and to report ``ACLNames`` from
:data:`ACL_MEMBERS`. Nothing in fleetgate's own code knows it talks to moto.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.request import Request, urlopen

DEFAULT_PAGE_SIZE = 100

ACL_MEMBERS: dict[tuple[str, str, str], set[str]] = {}
"""(account id, region, user name) -> ACL names the user belongs to (moto keeps none)."""

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
