"""What the sandbox creates in its AWS (moto): two regions, a VPC in each, MemoryDB
clusters tagged ``env`` and ``team``, and in each region two MemoryDB users in the
clusters' ACL: ``app`` (IAM-enabled: nobody needs a password for it), ``ops`` (a
password user, for the password path) and ``svc`` (a password user tagged
``fleetgate.dev/managed``: the agents set its password and rotate it, nobody knows it).

Everything goes through boto3 against ``AWS_ENDPOINT_URL``, as an operator's script
would against AWS; only the ACL membership, which moto does not keep, is recorded in
:data:`sandbox.aws.ACL_MEMBERS`.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any, Final

import boto3

from sandbox.aws import ACL_MEMBERS

REGIONS: Final = ("us-east-1", "eu-west-1")
ACCOUNT: Final = "123456789012"
"""moto's default account."""
ACL: Final = "sandbox-acl"
ENGINE_VERSION: Final = "7.1"
"""IAM authentication needs 7.0 or newer."""
IAM_USER: Final = "app"
PASSWORD_USER: Final = "ops"
MANAGED_USER: Final = "svc"
MANAGED_TAG: Final = {"Key": "fleetgate.dev/managed", "Value": "true"}
FIRST: Final = (
    ("orders", "dev", "us-east-1"),
    ("payments", "staging", "eu-west-1"),
    ("orders", "prod", "us-east-1"),
    ("payments", "prod", "eu-west-1"),
)
TEAMS: Final = ("orders", "payments", "search")
ENVS: Final = ("dev", "staging", "prod")


@dataclass(frozen=True)
class SeededCluster:
    name: str
    region: str
    env: str
    team: str
    vpc_id: str
    endpoint: str
    """The configuration endpoint's host, as MemoryDB (moto) reports it."""
    port: int

    @property
    def database(self) -> str:
        """The name discovery gives it: ``<cluster>-memorydb-<region>-<account>``."""
        return f"{self.name}-memorydb-{self.region}-{ACCOUNT}"


def plan(count: int, regions: Sequence[str] = REGIONS) -> list[tuple[str, str, str, str]]:
    """(name, team, env, region) of ``count`` clusters: the four of the walkthrough
    first, then more spread over the teams and environments; the regions in turn (for
    the two default regions, the walkthrough's own)."""
    out = [
        (f"{team}-{env}", team, env, regions[i % len(regions)])
        for i, (team, env, _) in enumerate(FIRST[:count])
    ]
    for i in range(len(out), count):
        team, env = TEAMS[i % len(TEAMS)], ENVS[i % len(ENVS)]
        out.append((f"{team}-{env}-{i + 1}", team, env, regions[i % len(regions)]))
    return out


@cache
def _client(service: str, region: str, endpoint: str) -> Any:
    """One client per service and region (making one takes ~0.1 s of CPU)."""
    return boto3.client(service, region_name=region, endpoint_url=endpoint or None)


def client(service: str, region: str) -> Any:
    return _client(service, region, os.environ.get("AWS_ENDPOINT_URL", ""))


def _network(region: str, cidr: str) -> str:
    ec2 = client("ec2", region)
    vpc = str(ec2.create_vpc(CidrBlock=cidr)["Vpc"]["VpcId"])
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock=cidr.replace("/16", "/24"))["Subnet"]
    client("memorydb", region).create_subnet_group(
        SubnetGroupName="sandbox", SubnetIds=[subnet["SubnetId"]]
    )
    return vpc


def _users(region: str, ops_password: str) -> None:
    memorydb = client("memorydb", region)
    modes: dict[str, dict[str, Any]] = {
        IAM_USER: {"Type": "iam"},
        PASSWORD_USER: {"Type": "password", "Passwords": [ops_password]},
    }
    for name, mode in modes.items():
        memorydb.create_user(UserName=name, AuthenticationMode=mode, AccessString="on ~* &* +@all")
        ACL_MEMBERS.setdefault((ACCOUNT, region, name), set()).add(ACL)
    # A throwaway first password nobody keeps: the agents replace it at once.
    memorydb.create_user(
        UserName=MANAGED_USER,
        AuthenticationMode={"Type": "password", "Passwords": [secrets.token_urlsafe(32)]},
        AccessString="on ~* &* +@all",
        Tags=[MANAGED_TAG],
    )
    ACL_MEMBERS.setdefault((ACCOUNT, region, MANAGED_USER), set()).add(ACL)


def seed(
    count: int, ops_password: str, regions: Sequence[str] = REGIONS
) -> tuple[dict[str, str], list[SeededCluster]]:
    """Create the networks, users and ``count`` clusters in ``regions``; return the VPC
    id of each region, and the clusters."""
    vpcs = {region: _network(region, f"10.{n}.0.0/16") for n, region in enumerate(regions, start=1)}
    for region in regions:
        _users(region, ops_password)
    out: list[SeededCluster] = []
    for name, team, env, region in plan(count, regions):
        cluster = client("memorydb", region).create_cluster(
            ClusterName=name,
            NodeType="db.t4g.small",
            ACLName=ACL,
            TLSEnabled=True,
            SubnetGroupName="sandbox",
            EngineVersion=ENGINE_VERSION,
            NumShards=1,
            Tags=[{"Key": "env", "Value": env}, {"Key": "team", "Value": team}],
        )["Cluster"]
        endpoint = cluster["ClusterEndpoint"]
        out.append(
            SeededCluster(
                name=name,
                region=region,
                env=env,
                team=team,
                vpc_id=vpcs[region],
                endpoint=str(endpoint["Address"]),
                port=int(endpoint.get("Port") or 6379),
            )
        )
    return vpcs, out


def describe_users(region: str) -> list[dict[str, Any]]:
    """Every page of DescribeUsers in ``region`` (what the stand-ins sync their ACLs from)."""
    pages = client("memorydb", region).get_paginator("describe_users").paginate()
    return [user for page in pages for user in page["Users"]]
