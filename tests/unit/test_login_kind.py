"""The ``kind`` label of a failed upstream login (``fleetgate_agent_upstream_failures``):
a managed db user's login is ``managed_password`` whatever strategy it wraps; another
user's is its inner strategy's (IAM for MemoryDB, ``other`` for client credentials)."""

from __future__ import annotations

from typing import Any

from dbservice.engine.login import ClientCredentials
from dbservice.gateway.listener import login_kind
from dbservice.managed.login import ManagedLogin
from dbservice.upstream.iam import IamAuth
from dbservice.upstream.iam_login import IamLogin
from tests.integration.test_iam_agent import record


class Service:
    """The managed-user service's one question here: is ``db_user`` managed?"""

    def managed(self, _resource: Any, db_user: str) -> object | None:
        return object() if db_user == "svc" else None


def test_login_kinds() -> None:
    db = record("")
    iam = IamLogin(IamAuth(), db)
    managed_iam = ManagedLogin(Service(), db, iam)  # type: ignore[arg-type]
    managed_plain = ManagedLogin(Service(), db, ClientCredentials())  # type: ignore[arg-type]
    assert login_kind(iam, "alice") == "iam"
    assert login_kind(ClientCredentials(), "app") == "other"
    assert login_kind(managed_iam, "svc") == "managed_password"
    assert login_kind(managed_iam, "alice") == "iam"
    assert login_kind(managed_plain, "svc") == "managed_password"
    assert login_kind(managed_plain, "app") == "other"
