"""Seeding moto with MemoryDB clusters the way an operator would create them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import boto3


@dataclass
class Network:
    vpc_id: str
    subnet_group: str


def client(service: str, region: str, creds: dict[str, str] | None = None) -> Any:
    kwargs: dict[str, Any] = {"region_name": region}
    if creds:
        kwargs.update(
            aws_access_key_id=creds["AccessKeyId"],
            aws_secret_access_key=creds["SecretAccessKey"],
            aws_session_token=creds["SessionToken"],
        )
    return boto3.client(service, **kwargs)


def network(
    region: str,
    name: str = "sg-main",
    creds: dict[str, str] | None = None,
    cidr: str = "10.0.0.0/16",
) -> Network:
    ec2 = client("ec2", region, creds)
    vpc = ec2.create_vpc(CidrBlock=cidr)["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock=cidr.replace("/16", "/24"))["Subnet"]
    client("memorydb", region, creds).create_subnet_group(
        SubnetGroupName=name, SubnetIds=[subnet["SubnetId"]]
    )
    return Network(vpc, name)


def cluster(
    region: str,
    name: str,
    *,
    net: Network | None = None,
    tags: dict[str, str] | None = None,
    tls: bool = True,
    creds: dict[str, str] | None = None,
    acl: str = "open-access",
    engine_version: str | None = None,
) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "ClusterName": name,
        "NodeType": "db.t4g.small",
        "ACLName": acl,
        "TLSEnabled": tls,
    }
    if net:
        kwargs["SubnetGroupName"] = net.subnet_group
    if tags:
        kwargs["Tags"] = [{"Key": k, "Value": v} for k, v in tags.items()]
    if engine_version:
        kwargs["EngineVersion"] = engine_version
    out: dict[str, Any] = client("memorydb", region, creds).create_cluster(**kwargs)["Cluster"]
    return out


def tag(region: str, arn: str, tags: dict[str, str], creds: dict[str, str] | None = None) -> None:
    client("memorydb", region, creds).tag_resource(
        ResourceArn=arn, Tags=[{"Key": k, "Value": v} for k, v in tags.items()]
    )


def delete(region: str, name: str, creds: dict[str, str] | None = None) -> None:
    client("memorydb", region, creds).delete_cluster(ClusterName=name)


def assume(role_arn: str, external_id: str | None = None) -> dict[str, str]:
    """Credentials of ``role_arn`` (moto keys the assumed role's resources to its account)."""
    kwargs: dict[str, Any] = {"RoleArn": role_arn, "RoleSessionName": "seed"}
    if external_id:
        kwargs["ExternalId"] = external_id
    creds: dict[str, str] = boto3.client("sts", region_name="us-east-1").assume_role(**kwargs)[
        "Credentials"
    ]
    return creds
