"""The AWS identity proof without the network: ARNs as rules see them, which rule an
identity logs in with, and every check made before STS is asked
(:mod:`dbservice.access.awsid`, :func:`dbservice.auth.admin.choose_aws_rule`)."""

from __future__ import annotations

import base64
import datetime as dt
from typing import Any

import botocore.session
import pytest

from bus.access import AwsRule, Identity
from dbservice.access.awsid import (
    SERVER_ID_HEADER,
    AwsIdentity,
    IdentityRefused,
    check_proof,
    parse_sts_answer,
    principal_arn,
    sign_identity_request,
)
from dbservice.access.ca import CertificateAuthority, decode_identity, new_key
from dbservice.auth.admin import RuleChoice, choose_aws_rule

ACC = "123456789012"
SERVER = "auth.fleet.example"


@pytest.mark.parametrize(
    ("arn", "principal"),
    [
        (f"arn:aws:sts::{ACC}:assumed-role/ci-deploy/job-42", f"arn:aws:iam::{ACC}:role/ci-deploy"),
        # a session name may hold characters globs care about; only the role is kept
        (f"arn:aws:sts::{ACC}:assumed-role/ci/i-0abc@x.y", f"arn:aws:iam::{ACC}:role/ci"),
        (
            f"arn:aws-cn:sts::{ACC}:assumed-role/agent/i-1",
            f"arn:aws-cn:iam::{ACC}:role/agent",
        ),
        (f"arn:aws:iam::{ACC}:user/ops/alice", f"arn:aws:iam::{ACC}:user/ops/alice"),
        (f"arn:aws:sts::{ACC}:federated-user/bob", f"arn:aws:sts::{ACC}:federated-user/bob"),
        (f"arn:aws:iam::{ACC}:root", f"arn:aws:iam::{ACC}:root"),
        (
            f"arn:aws:sts::{ACC}:assumed-role/no-session",
            f"arn:aws:sts::{ACC}:assumed-role/no-session",
        ),
        ("not an arn", "not an arn"),
    ],
)
def test_an_assumed_role_session_reads_as_its_role(arn: str, principal: str) -> None:
    assert principal_arn(arn) == principal


def ident(arn: str, account: str = ACC) -> AwsIdentity:
    return AwsIdentity(account=account, arn=arn, user_id="AROAEXAMPLE:job")


def rule(
    name: str, *arns: str, account: str | None = None, roles: tuple[str, ...] = ("ci",)
) -> AwsRule:
    return AwsRule(name=name, arns=arns, account=account, roles=roles)


def test_rules_match_the_role_arn_the_session_and_the_account() -> None:
    ci = rule("ci-bot", f"arn:aws:iam::{ACC}:role/ci-*")
    session = ident(f"arn:aws:sts::{ACC}:assumed-role/ci-deploy/job-42")
    choice = choose_aws_rule([ci], session)
    assert choice == RuleChoice(ci, ("ci",))
    # another role, another account: no rule
    assert "no rule admits" in str(
        choose_aws_rule([ci], ident(f"arn:aws:sts::{ACC}:assumed-role/web/x"))
    )
    other = ident("arn:aws:sts::999999999999:assumed-role/ci-deploy/x", "999999999999")
    refusal = choose_aws_rule([ci], other)
    assert isinstance(refusal, str)
    assert "arn:aws:iam::999999999999:role/ci-deploy" in refusal and "add-aws" in refusal
    # a rule may name sessions (the raw ARN), and demand an account
    agents = rule("agents", "arn:aws:sts::*:assumed-role/fleetgate-agent/*", account=ACC)
    assert isinstance(
        choose_aws_rule([agents], ident(f"arn:aws:sts::{ACC}:assumed-role/fleetgate-agent/i-1")),
        RuleChoice,
    )
    elsewhere = ident("arn:aws:sts::111111111111:assumed-role/fleetgate-agent/i-1", "111111111111")
    assert isinstance(choose_aws_rule([agents], elsewhere), str)
    # globs are case-sensitive, as ARNs are
    assert isinstance(
        choose_aws_rule([ci], ident(f"arn:aws:sts::{ACC}:assumed-role/CI-deploy/x")), str
    )


def test_several_matching_rules_need_a_role_to_choose() -> None:
    wide = rule("ci-all", f"arn:aws:iam::{ACC}:role/*", roles=("read",))
    narrow = rule("ci-deploy", f"arn:aws:iam::{ACC}:role/ci-*", roles=("ci", "deploy"))
    who = ident(f"arn:aws:sts::{ACC}:assumed-role/ci-x/job")
    refusal = choose_aws_rule([wide, narrow], who)
    assert isinstance(refusal, str) and "several rules (ci-all, ci-deploy)" in refusal
    assert choose_aws_rule([wide, narrow], who, "deploy") == RuleChoice(narrow, ("deploy",))
    refused = choose_aws_rule([wide, narrow], who, "admin")
    assert isinstance(refused, str) and "role 'admin' is not granted" in refused


@pytest.mark.parametrize(
    ("arns", "account", "problem"),
    [
        ((), None, "at least one ARN pattern"),
        (("role/ci-*",), None, "is not an ARN pattern"),
        (("arn:aws:iam::1:role/[ab]",), None, "no spaces or [ ]"),
        ((f"arn:aws:iam::{ACC}:role/x",), "12-34", "twelve digits"),
    ],
)
def test_bad_rules_are_refused_with_the_reason(
    arns: tuple[str, ...], account: str | None, problem: str
) -> None:
    with pytest.raises(ValueError, match=problem.replace("[", r"\[").replace("]", r"\]")):
        AwsRule(name="ci", arns=arns, account=account)


# -- the proof --------------------------------------------------------------------------


def session(region: str = "eu-west-1") -> Any:
    s = botocore.session.Session()
    s.set_credentials("AKIAEXAMPLE", "secret", "token")
    s.set_config_variable("region", region)
    s.set_config_variable("credentials_file", "/nonexistent")
    s.set_config_variable("config_file", "/nonexistent")
    return s


@pytest.fixture(autouse=True)
def no_endpoint_override(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_STS", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)


def signed_at(proof: dict[str, Any]) -> dt.datetime:
    stamp = proof["headers"]["X-Amz-Date"]
    return dt.datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.UTC)


def test_a_signed_request_passes_and_carries_no_credentials() -> None:
    proof = sign_identity_request(session(), SERVER)
    assert proof["url"] == "https://sts.eu-west-1.amazonaws.com/"
    assert "secret" not in repr(proof)
    signed = proof["headers"]["Authorization"].split("SignedHeaders=")[1].split(",")[0]
    assert {"host", "x-amz-date", "x-fleetgate-server-id"} <= set(signed.split(";"))
    checked = check_proof(proof, SERVER, now=signed_at(proof))
    assert checked.url == proof["url"] and checked.body == base64.b64decode(proof["body"])
    assert checked.headers["Host"] == "sts.eu-west-1.amazonaws.com"
    assert checked.headers[SERVER_ID_HEADER] == SERVER
    # the global endpoint, FIPS and China are STS too
    for url in (
        "https://sts.amazonaws.com/",
        "https://sts-fips.us-east-1.amazonaws.com/",
        "https://sts.cn-north-1.amazonaws.com.cn",
    ):
        check_proof({**proof, "url": url}, SERVER, now=signed_at(proof))


def refusal(proof: Any, *, now: dt.datetime | None = None, **kwargs: Any) -> str:
    with pytest.raises(IdentityRefused) as info:
        check_proof(proof, SERVER, now=now, **kwargs)
    return str(info.value)


def test_a_request_signed_for_another_service_is_refused() -> None:
    other = sign_identity_request(session(), "vault.example")
    assert "signed for another service" in refusal(other, now=signed_at(other))
    # without the header at all (e.g. signed by a plain GetCallerIdentity call)
    proof = sign_identity_request(session(), SERVER)
    del proof["headers"][SERVER_ID_HEADER]
    assert "signed but not sent: x-fleetgate-server-id" in refusal(proof, now=signed_at(proof))
    bare = sign_identity_request(session(), SERVER)
    auth = bare["headers"]["Authorization"].replace(";x-fleetgate-server-id", "")
    bare["headers"]["Authorization"] = auth
    assert "does not cover x-fleetgate-server-id" in refusal(bare, now=signed_at(bare))


def test_dates_more_than_five_minutes_off_are_refused() -> None:
    proof = sign_identity_request(session(), SERVER)
    at = signed_at(proof)
    check_proof(proof, SERVER, now=at + dt.timedelta(seconds=299))
    assert "is 301s old" in refusal(proof, now=at + dt.timedelta(seconds=301))
    assert "in the future" in refusal(proof, now=at - dt.timedelta(seconds=400))
    # configurable
    check_proof(proof, SERVER, now=at + dt.timedelta(seconds=500), max_age=600)


@pytest.mark.parametrize(
    "url",
    [
        "https://evil.example.com/",
        "https://sts.amazonaws.com.evil.example/",
        "http://sts.amazonaws.com/",  # not HTTPS
        "https://sts.amazonaws.com:8443/",
        "https://sts.amazonaws.com/?Action=AssumeRole",
        "https://user@sts.amazonaws.com/",
        "https://sts.us-east-1.amazonaws.com/other",
        "http://127.0.0.1:5000/",  # a test endpoint, not configured
    ],
)
def test_urls_other_than_sts_are_refused(url: str) -> None:
    proof = sign_identity_request(session(), SERVER)
    assert "is not an STS endpoint" in refusal({**proof, "url": url}, now=signed_at(proof))


def test_a_configured_endpoint_is_accepted_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:5000")
    proof = sign_identity_request(session(), SERVER)
    assert proof["url"] == "http://127.0.0.1:5000/"
    check_proof(proof, SERVER, endpoints=["http://127.0.0.1:5000"], now=signed_at(proof))
    assert "not an STS endpoint" in refusal(
        proof, endpoints=["http://127.0.0.1:5001"], now=signed_at(proof)
    )


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"body": base64.b64encode(b"Action=AssumeRole&Version=2011-06-15").decode()}, "exactly"),
        (
            {"body": base64.b64encode(b"Action=GetCallerIdentity&Version=2011-06-15&X=1").decode()},
            "exactly",
        ),
        ({"body": "%%%"}, "not base64"),
        ({"method": "GET"}, "must be a POST"),
        ({"headers": {"Authorization": "Basic x"}}, "no AWS4-HMAC-SHA256"),
        ({"headers": "x"}, "headers"),
        ({"url": None}, "url"),
    ],
)
def test_malformed_proofs_say_what_is_wrong(change: dict[str, Any], problem: str) -> None:
    proof = sign_identity_request(session(), SERVER)
    assert problem in refusal({**proof, **change}, now=signed_at(proof))


def test_a_host_header_must_be_the_urls() -> None:
    proof = sign_identity_request(session(), SERVER)
    proof["headers"]["Host"] = "sts.us-east-1.amazonaws.com"
    assert "is not the host of the url" in refusal(proof, now=signed_at(proof))
    assert "not an object" in refusal(["x"])


def test_sts_answers_are_read_and_its_refusals_named() -> None:
    ok = (
        b'<GetCallerIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">'
        b"<GetCallerIdentityResult><Arn>arn:aws:sts::123456789012:assumed-role/r/s</Arn>"
        b"<UserId>AROA:s</UserId><Account>123456789012</Account></GetCallerIdentityResult>"
        b"</GetCallerIdentityResponse>"
    )
    who = parse_sts_answer(200, ok)
    assert who == AwsIdentity(
        "123456789012", "arn:aws:sts::123456789012:assumed-role/r/s", "AROA:s"
    )
    denied = (
        b"<ErrorResponse><Error><Type>Sender</Type><Code>SignatureDoesNotMatch</Code>"
        b"<Message>The request signature we calculated does not match</Message></Error>"
        b"</ErrorResponse>"
    )
    with pytest.raises(
        IdentityRefused, match="STS refused the signed request \\(SignatureDoesNotMatch"
    ):
        parse_sts_answer(403, denied)


def test_the_certificate_carries_the_aws_principal_and_old_ones_read_without() -> None:
    ca = CertificateAuthority.create()
    arn = "arn:aws:sts::123456789012:assumed-role/ci/job-1"
    cert = ca.issue_client(
        new_key().public_key(), Identity(user="ci", roles=("ci",), kind="bot", aws_arn=arn), 60
    )
    assert decode_identity(cert).aws_arn == arn
    plain = ca.issue_client(new_key().public_key(), Identity(user="alice"), 60)
    assert decode_identity(plain).aws_arn == ""


@pytest.mark.parametrize("header", ["Transfer-Encoding", "content-length", "Connection"])
def test_framing_headers_are_refused_not_forwarded(header: str) -> None:
    """The service's HTTP client frames the request to STS itself: a proof may not set
    Transfer-Encoding or Content-Length (an aiohttp error, a 500, or a second request)."""
    proof = sign_identity_request(session(), SERVER)
    proof["headers"][header] = "chunked"
    assert "may not be sent" in refusal(proof, now=signed_at(proof))


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("X-Amz-Date", "2026\r\nX-Evil: 1"),
        ("X-Note", "caf\u00e9"),
        ("Bad Name", "x"),
        ("X-A", "\0"),
    ],
)
def test_header_names_and_values_must_be_printable_ascii(name: str, value: str) -> None:
    proof = sign_identity_request(session(), SERVER)
    now = signed_at(proof)
    proof["headers"][name] = value
    assert "printable ASCII" in refusal(proof, now=now)
