"""Least-privilege IAM policy documents for fleetgate's processes (pure).

* discovery: the four MemoryDB calls it makes (DescribeClusters, DescribeSubnetGroups,
  DescribeUsers, ListTags) and ``sts:GetCallerIdentity`` (its account id);
* the agent: ``memorydb:Connect`` on the cluster *and* the user ARNs (MemoryDB checks
  both), ``memorydb:DescribeUsers`` (is a user IAM-enabled) and ``sts:GetCallerIdentity``;
  for managed users, ``memorydb:DescribeACLs``/``ListTags``/``UpdateUser``, Secrets
  Manager on the secrets under the managed-user prefix only, and KMS through Secrets
  Manager only (``kms:ViaService``);
* either: ``sts:AssumeRole`` on the roles its config names.

Cluster ARNs narrow the agent's policy to those clusters (and their users in the same
account and region); without them the resources are wildcards for every cluster.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final

POLICY_VERSION: Final = "2012-10-17"
DISCOVERY_ACTIONS: Final = (
    "memorydb:DescribeClusters",
    "memorydb:DescribeSubnetGroups",
    "memorydb:DescribeUsers",
    "memorydb:ListTags",
)
_CLUSTER_ARN = re.compile(
    r"^arn:(?P<partition>aws[a-z-]*):memorydb:(?P<region>[a-z0-9-]+):(?P<account>\d{12})"
    r":cluster/(?P<name>[A-Za-z0-9-]+)$"
)
_USER_NAME = re.compile(r"^[a-zA-Z][a-zA-Z0-9-]*$")
DEFAULT_SECRET_PREFIX: Final = "fleetgate/"
SECRET_ACTIONS: Final = (
    "secretsmanager:CreateSecret",
    "secretsmanager:DescribeSecret",
    "secretsmanager:GetSecretValue",
    "secretsmanager:PutSecretValue",
    "secretsmanager:TagResource",
    "secretsmanager:DeleteSecret",
)
"""What managed users need of Secrets Manager (TagResource: CreateSecret with tags)."""
_ROLE_ARN = re.compile(r"^arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]+$")

Policy = dict[str, Any]


@dataclass(frozen=True)
class ClusterArn:
    partition: str
    region: str
    account: str
    name: str

    @classmethod
    def parse(cls, arn: str) -> ClusterArn:
        """ValueError (saying what one looks like) for anything else."""
        match = _CLUSTER_ARN.match(arn.strip())
        if match is None:
            raise ValueError(
                f"{arn!r} is not a MemoryDB cluster ARN "
                "(arn:aws:memorydb:us-east-1:123456789012:cluster/NAME)"
            )
        return cls(**match.groupdict())

    @property
    def arn(self) -> str:
        return f"arn:{self.partition}:memorydb:{self.region}:{self.account}:cluster/{self.name}"

    def user_arn(self, user: str) -> str:
        return f"arn:{self.partition}:memorydb:{self.region}:{self.account}:user/{user}"


def partition_of(region: str) -> str:
    if region.startswith("cn-"):
        return "aws-cn"
    if region.startswith("us-gov-"):
        return "aws-us-gov"
    return "aws"


def check_role_arn(arn: str) -> str:
    if not _ROLE_ARN.match(arn):
        raise ValueError(f"{arn!r} is not an IAM role ARN (arn:aws:iam::123456789012:role/name)")
    return arn


def check_user_name(name: str) -> str:
    if not _USER_NAME.match(name):
        raise ValueError(
            f"{name!r} is not a MemoryDB user name (a letter, then letters, digits, hyphens)"
        )
    return name


def _document(statements: list[dict[str, Any]]) -> Policy:
    return {"Version": POLICY_VERSION, "Statement": statements}


def _assume(roles: list[str], sid: str) -> list[dict[str, Any]]:
    if not roles:
        return []
    return [{"Sid": sid, "Effect": "Allow", "Action": "sts:AssumeRole", "Resource": sorted(roles)}]


def discovery_policy(*, roles: list[str] | None = None) -> Policy:
    """What ``fleetgate discovery run`` calls (DescribeX/ListTags support no narrower
    resource than ``*`` for the list calls, so the resource is ``*``)."""
    return _document(
        [
            {
                "Sid": "FleetgateDiscoverMemoryDB",
                "Effect": "Allow",
                "Action": list(DISCOVERY_ACTIONS),
                "Resource": "*",
            },
            {
                "Sid": "FleetgateWhoAmI",
                "Effect": "Allow",
                "Action": "sts:GetCallerIdentity",
                "Resource": "*",
            },
            *_assume(roles or [], "FleetgateDiscoveryAssumeRoles"),
        ]
    )


def connect_statement(cluster_arns: list[str], user_arns: list[str]) -> dict[str, Any]:
    return {
        "Sid": "FleetgateMemoryDBConnect",
        "Effect": "Allow",
        "Action": "memorydb:Connect",
        "Resource": [*cluster_arns, *user_arns],
    }


def agent_policy(
    *,
    clusters: list[ClusterArn] | None = None,
    users: list[str] | None = None,
    roles: list[str] | None = None,
    secret_prefix: str = DEFAULT_SECRET_PREFIX,
    kms_keys: list[str] | None = None,
) -> Policy:
    """What ``fleetgate agent run`` needs to log in to MemoryDB by IAM token and to keep
    managed users' passwords; ``users`` narrows the user ARNs (in each cluster's account
    and region) from every user; ``kms_keys`` names the KMS keys of the secrets (default:
    any key, used only through Secrets Manager)."""
    if clusters:
        cluster_arns = sorted({c.arn for c in clusters})
        user_arns = sorted({c.user_arn(u) for c in clusters for u in users or ["*"]})
        all_users = sorted({c.user_arn("*") for c in clusters})
        places = sorted({(c.partition, c.region, c.account) for c in clusters})
        secret_arns = [
            f"arn:{p}:secretsmanager:{r}:{a}:secret:{secret_prefix}memorydb/{r}/{a}/user/*"
            for p, r, a in places
        ]
    else:
        cluster_arns = ["arn:aws:memorydb:*:*:cluster/*"]
        user_arns = [f"arn:aws:memorydb:*:*:user/{u}" for u in users or ["*"]]
        all_users = ["arn:aws:memorydb:*:*:user/*"]
        secret_arns = [f"arn:aws:secretsmanager:*:*:secret:{secret_prefix}memorydb/*"]
    return _document(
        [
            connect_statement(cluster_arns, user_arns),
            {
                "Sid": "FleetgateIsUserIAM",
                "Effect": "Allow",
                "Action": "memorydb:DescribeUsers",
                "Resource": "*",
            },
            {
                "Sid": "FleetgateManagedUsersFind",
                "Effect": "Allow",
                "Action": ["memorydb:DescribeACLs", "memorydb:ListTags"],
                "Resource": "*",
            },
            {
                "Sid": "FleetgateManagedUsersSetPasswords",
                "Effect": "Allow",
                "Action": "memorydb:UpdateUser",
                "Resource": all_users,
            },
            {
                "Sid": "FleetgateManagedUsersSecrets",
                "Effect": "Allow",
                "Action": list(SECRET_ACTIONS),
                "Resource": secret_arns,
            },
            {
                "Sid": "FleetgateManagedUsersKms",
                "Effect": "Allow",
                "Action": ["kms:GenerateDataKey", "kms:Decrypt"],
                "Resource": sorted(kms_keys) if kms_keys else "*",
                "Condition": {"StringLike": {"kms:ViaService": "secretsmanager.*.amazonaws.com"}},
            },
            *_assume(roles or [], "FleetgateAgentAssumeRoles"),
        ]
    )


def connect_policy(cluster_arn: str, user_arn: str) -> Policy:
    """The one statement a refused IAM login needs, with both ARNs filled in."""
    return _document([connect_statement([cluster_arn], [user_arn])])
