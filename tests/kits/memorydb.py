"""A MemoryDB cluster as the agent tests need it: created in the AWS stand-in with an
IAM user ``alice`` and a password user ``bob`` in its ACL, served by the MemoryDB
stand-in whose fronts check IAM tokens and passwords as MemoryDB does."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from sandbox.aws import ACL_MEMBERS
from sandbox.iamfront import IamFront, MemoryDBLogin
from sandbox.memorydb import MemoryDBStandin, StandinConfig
from tests.kits import seed

REGION = "us-east-1"
ACCOUNT = "123456789012"
BOB_PASSWORD = "bob-password-0123456789"


def config_endpoint(cluster: str) -> str:
    """The configuration endpoint MemoryDB names for ``cluster`` (the fronts' name)."""
    return f"clustercfg.{cluster}.abc123.memorydb.{REGION}.amazonaws.com"


@contextlib.asynccontextmanager
async def iam_cluster(
    directory: Path, *, cluster: str, acl: str, shards: int = 1
) -> AsyncIterator[tuple[MemoryDBStandin, MemoryDBLogin]]:
    """The cluster with ``alice`` (IAM) and ``bob`` (password) in ``acl``; the stand-in
    and the login checker its fronts use. Needs the ``aws`` fixture."""
    seed.cluster(REGION, cluster, acl=acl, engine_version="7.1")
    memorydb = seed.client("memorydb", REGION)
    for name, mode in (
        ("alice", {"Type": "iam"}),
        ("bob", {"Type": "password", "Passwords": [BOB_PASSWORD]}),
    ):
        memorydb.create_user(UserName=name, AuthenticationMode=mode, AccessString="on ~* +@all")
        ACL_MEMBERS.setdefault((ACCOUNT, REGION, name), set()).add(acl)
    login = MemoryDBLogin(cluster=cluster, region=REGION)
    login.set_password("bob", BOB_PASSWORD)
    config = StandinConfig(
        dir=directory,
        extra_dns_names=[config_endpoint(cluster)],
        front_factory=IamFront.factory(login),
        shards=shards,
    )
    async with MemoryDBStandin(config) as db:
        await login.sync_from_aws(db.nodes)
        yield db, login
