"""The sandbox's AWS: moto's server behind fleetgate's HTTP layer (sandbox/aws.py), spoken
to with boto3 as any AWS client would. What moto lacks for MemoryDB (AWS paging, ACL
membership, DescribeACLs, passwords per user, at most two) is the layer's, read off
the wire; everything else is moto's."""

from __future__ import annotations

from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError

from sandbox import aws as sandbox_aws
from sandbox.aws import ACL_MEMBERS, USER_PASSWORDS, MotoServer, assumed_role, on_user_change

ACCOUNT = "123456789012"
REGION = "us-east-1"


def memorydb(region: str = REGION) -> Any:
    return boto3.client("memorydb", region_name=region)


def make_clusters(count: int) -> None:
    client = memorydb()
    for i in range(count):
        client.create_cluster(ClusterName=f"c{i:03d}", NodeType="db.t4g.small", ACLName="acl-a")


def test_moto_assumptions_the_layer_relies_on(aws: MotoServer) -> None:
    """The two things the layer takes from moto beyond the AWS wire protocols: the
    documented ThreadedMotoServer, and that DescribeUsers lists the region's `default`
    user (as AWS does), whose ARN names the account DescribeACLs answers for."""
    from moto.server import ThreadedMotoServer

    assert callable(ThreadedMotoServer.get_host_and_port)
    users = memorydb().describe_users()["Users"]
    assert [u["ARN"] for u in users if u["Name"] == "default"] == [
        f"arn:aws:memorydb:{REGION}:{ACCOUNT}:user/default"
    ]


@pytest.mark.parametrize(("size", "pages"), [(None, [100, 100, 50]), (7, [7] * 35 + [5])])
def test_describe_clusters_pages_like_aws(
    aws: MotoServer, size: int | None, pages: list[int]
) -> None:
    make_clusters(250)
    client = memorydb()
    seen: list[int] = []
    names: list[str] = []
    kwargs: dict[str, Any] = {"MaxResults": size} if size else {}
    while True:
        reply = client.describe_clusters(**kwargs)
        seen.append(len(reply["Clusters"]))
        names += [c["Name"] for c in reply["Clusters"]]
        if "NextToken" not in reply:
            break
        kwargs["NextToken"] = reply["NextToken"]
    assert seen == pages
    assert names == [f"c{i:03d}" for i in range(250)]
    # boto3's own paginator reaches the same end
    paginated = [
        c["Name"]
        for page in client.get_paginator("describe_clusters").paginate()
        for c in page["Clusters"]
    ]
    assert paginated == names


def test_users_and_subnet_groups_page_too(aws: MotoServer) -> None:
    client = memorydb()
    for i in range(5):
        client.create_user(
            UserName=f"u{i}", AccessString="on ~* +@all", AuthenticationMode={"Type": "iam"}
        )
    first = client.describe_users(MaxResults=4)
    assert len(first["Users"]) == 4 and first["NextToken"]
    rest = client.describe_users(MaxResults=4, NextToken=first["NextToken"])
    assert len(rest["Users"]) == 2 and "NextToken" not in rest  # 5 users and `default`
    groups = client.describe_subnet_groups(MaxResults=1)
    assert len(groups["SubnetGroups"]) == 1


def test_a_token_aws_never_gave_is_refused(aws: MotoServer) -> None:
    with pytest.raises(ClientError) as caught:
        memorydb().describe_clusters(NextToken="not-a-token")
    assert caught.value.response["Error"]["Code"] == "InvalidParameterValueException"


def test_acl_membership_from_the_configuration(aws: MotoServer) -> None:
    client = memorydb()
    client.create_user(
        UserName="app", AccessString="on ~* +@all", AuthenticationMode={"Type": "iam"}
    )
    client.create_user(
        UserName="ops", AccessString="on ~* +@all",
        AuthenticationMode={"Type": "password", "Passwords": ["p" * 16]},
    )  # fmt: skip
    ACL_MEMBERS[(ACCOUNT, REGION, "app")] = {"acl-a", "acl-b"}
    ACL_MEMBERS[(ACCOUNT, REGION, "ops")] = {"acl-a"}
    ACL_MEMBERS[(ACCOUNT, "eu-west-1", "elsewhere")] = {"acl-a"}
    users = {u["Name"]: u["ACLNames"] for u in client.describe_users()["Users"]}
    assert users["app"] == ["acl-a", "acl-b"] and users["ops"] == ["acl-a"]
    acls = {a["Name"]: a["UserNames"] for a in client.describe_acls()["ACLs"]}
    assert {k: v for k, v in acls.items() if k.startswith("acl-")} == {
        "acl-a": ["app", "ops"],
        "acl-b": ["app"],
    }
    one = client.describe_acls(ACLName="acl-b")["ACLs"]
    assert [(a["Name"], a["ARN"]) for a in one] == [
        ("acl-b", f"arn:aws:memorydb:{REGION}:{ACCOUNT}:acl/acl-b")
    ]
    in_eu = memorydb("eu-west-1").describe_acls()["ACLs"]
    assert [(a["Name"], a["UserNames"]) for a in in_eu if a["Name"] == "acl-a"] == []
    with pytest.raises(ClientError) as caught:
        client.describe_acls(ACLName="nope")
    assert caught.value.response["Error"]["Code"] == "ACLNotFoundFault"


def test_passwords_kept_at_most_two_and_listeners_told(aws: MotoServer) -> None:
    client = memorydb()
    told: list[tuple[str, ...]] = []
    remove = on_user_change(lambda *change: told.append(change))
    try:
        mode = {"Type": "password", "Passwords": ["a" * 16]}
        client.create_user(UserName="svc", AccessString="on ~* +@all", AuthenticationMode=mode)
        assert USER_PASSWORDS[(ACCOUNT, REGION, "svc")] == ("a" * 16,)
        for count in (0, 3):
            bad: dict[str, Any] = {"Type": "password"}
            if count:
                bad["Passwords"] = ["b" * 16] * count
            with pytest.raises(ClientError) as caught:
                client.update_user(UserName="svc", AuthenticationMode=bad)
            assert caught.value.response["Error"]["Code"] == "InvalidParameterValueException"
            assert f"not {count}" in caught.value.response["Error"]["Message"]
        client.update_user(
            UserName="svc",
            AuthenticationMode={"Type": "password", "Passwords": ["a" * 16, "c" * 16]},
        )
        client.update_user(UserName="svc", AccessString="on ~app:* +@read")  # no mode: kept
        assert USER_PASSWORDS[(ACCOUNT, REGION, "svc")] == ("a" * 16, "c" * 16)
        user = client.describe_users(UserName="svc")["Users"][0]
        assert user["Authentication"] == {"Type": "password", "PasswordCount": 2}
        assert user["AccessString"] == "on ~app:* +@read"
        client.update_user(UserName="svc", AuthenticationMode={"Type": "iam"})
        assert USER_PASSWORDS[(ACCOUNT, REGION, "svc")] == ()
    finally:
        remove()
    assert told == [
        (ACCOUNT, REGION, "svc", "password", ("a" * 16,)),
        (ACCOUNT, REGION, "svc", "password", ("a" * 16, "c" * 16)),
        (ACCOUNT, REGION, "svc", "iam", ()),
    ]
    client.delete_user(UserName="svc")
    assert (ACCOUNT, REGION, "svc") not in USER_PASSWORDS


def test_assumed_roles_remembered_with_their_external_id(aws: MotoServer) -> None:
    sts = boto3.client("sts", region_name=REGION)
    role = f"arn:aws:iam::{ACCOUNT}:role/reader"
    creds = sts.assume_role(RoleArn=role, RoleSessionName="session", ExternalId="ext-9")[
        "Credentials"
    ]
    seen = assumed_role(creds["AccessKeyId"])
    assert seen is not None
    assert (seen.role_arn, seen.external_id, seen.secret_access_key) == (
        role,
        "ext-9",
        creds["SecretAccessKey"],
    )
    assert assumed_role("AKIANOTHANDEDOUT") is None


def test_everything_else_is_moto_and_reset_forgets_it_all(aws: MotoServer) -> None:
    secrets = boto3.client("secretsmanager", region_name=REGION)
    secrets.create_secret(Name="s1", SecretString="v", Tags=[{"Key": "k", "Value": "v"}])
    assert secrets.get_secret_value(SecretId="s1")["SecretString"] == "v"
    make_clusters(1)
    ACL_MEMBERS[(ACCOUNT, REGION, "app")] = {"acl-a"}
    USER_PASSWORDS[(ACCOUNT, REGION, "app")] = ("x",)
    boto3.client("sts", region_name=REGION).assume_role(
        RoleArn=f"arn:aws:iam::{ACCOUNT}:role/r", RoleSessionName="session"
    )
    assert sandbox_aws.assumed_roles()
    aws.reset()
    assert memorydb().describe_clusters()["Clusters"] == []
    assert secrets.list_secrets()["SecretList"] == []
    assert ACL_MEMBERS == {} and USER_PASSWORDS == {} and sandbox_aws.assumed_roles() == []
