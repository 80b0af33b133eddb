"""Who is in a MemoryDB ACL: a narrow seam, because that is the one MemoryDB fact a
test kit may not keep (moto keeps no ACL membership).

:class:`DescribeAcls` asks ``DescribeACLs`` (one call per ACL, the ``UserNames`` of the
answer); :class:`UserAclNames` reads the ``ACLNames`` of each user from
``DescribeUsers`` (no extra call: the users are described anyway). Tests and the sandbox
may pass their own (``sandbox.aws.SandboxAclMembership`` reads the stand-in's
configuration).
"""

from __future__ import annotations

from typing import Protocol

from dbservice.managed.aws import ManagedAws, MemoryDBUserInfo


class AclMembership(Protocol):
    async def members(
        self,
        aws: ManagedAws,
        *,
        account: str,
        acl_name: str,
        users: list[MemoryDBUserInfo],
    ) -> set[str]:
        """Names of the users in ACL ``acl_name`` (``users``: DescribeUsers of the region)."""
        ...


class DescribeAcls:
    async def members(
        self,
        aws: ManagedAws,
        *,
        account: str,
        acl_name: str,
        users: list[MemoryDBUserInfo],
    ) -> set[str]:
        return await aws.acl_members(acl_name)


class UserAclNames:
    async def members(
        self,
        aws: ManagedAws,
        *,
        account: str,
        acl_name: str,
        users: list[MemoryDBUserInfo],
    ) -> set[str]:
        return {u.name for u in users if acl_name in u.acl_names}


def membership(kind: str) -> AclMembership:
    """The lookup named in the agent config (``describe-acls`` or ``describe-users``)."""
    if kind == "describe-users":
        return UserAclNames()
    return DescribeAcls()
