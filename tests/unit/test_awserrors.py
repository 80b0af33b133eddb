"""The one line every process gives for a failed AWS call (fleetgate/awserrors.py), and
the three callers that classify it their own way."""

from __future__ import annotations

import botocore.exceptions as be

from dbservice.managed.aws import NotFound, _error
from dbservice.upstream.iam import AwsUnavailable, NoCredentials, _aws_error
from discovery.aws.errors import FetchForbidden, FetchThrottled, map_error
from fleetgate import awserrors


def client_error(code: str, message: str = "") -> be.ClientError:
    return be.ClientError({"Error": {"Code": code, "Message": message}}, "Op")


def test_reason_is_what_code_and_one_line_of_message() -> None:
    denied = client_error("AccessDeniedException", "User: x is not\n   authorized " + "y" * 400)
    text = awserrors.reason(denied, "DescribeClusters in us-east-1")
    assert text.startswith(
        "DescribeClusters in us-east-1: AccessDeniedException: User: x is not authorized y"
    )
    assert "\n" not in text and len(text) < 330
    assert awserrors.reason(client_error("Throttling"), "ListTags") == "ListTags: Throttling"
    unreachable = be.EndpointConnectionError(endpoint_url="https://memorydb.example")
    assert awserrors.reason(unreachable, "ListTags") == (
        "ListTags: cannot reach AWS at https://memorydb.example"
    )
    assert awserrors.error_code(denied) == "AccessDeniedException"
    assert awserrors.error_code(ValueError("x")) == ""


def test_each_caller_classifies_the_same_reason() -> None:
    denied = client_error("AccessDenied", "no")
    fetch = map_error(denied, "DescribeUsers")
    assert isinstance(fetch, FetchForbidden) and str(fetch) == "DescribeUsers: AccessDenied: no"
    assert isinstance(map_error(client_error("ThrottlingException"), "x"), FetchThrottled)
    iam = _aws_error(denied, "DescribeUsers")
    assert isinstance(iam, AwsUnavailable)
    assert str(iam).startswith("DescribeUsers: AccessDenied: no (check the agent's IAM policy")
    assert isinstance(_aws_error(be.NoCredentialsError(), "x"), NoCredentials)
    managed = _error(client_error("ResourceNotFoundException", "gone"), "GetSecretValue")
    assert (
        isinstance(managed, NotFound)
        and str(managed) == "GetSecretValue: ResourceNotFoundException: gone"
    )
