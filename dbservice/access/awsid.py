"""Proving an AWS identity without sending AWS credentials: a signed
``sts:GetCallerIdentity`` request (the method of Vault's AWS auth and Teleport's IAM join).

Client side (:func:`sign_identity_request`): with the program's own AWS credentials
(environment, profile, instance profile, IRSA, ECS task role: whatever botocore finds),
sign a ``POST Action=GetCallerIdentity&Version=2011-06-15`` to STS (the regional endpoint,
or the one ``AWS_ENDPOINT_URL`` names) with SigV4, including the header
:data:`SERVER_ID_HEADER` set to the auth service's id among the signed headers. The proof
is ``{method, url, headers, body}`` (body in base64): the signature, never the
credentials.

Service side (:func:`verify_identity_request`): refuse unless the URL is an STS endpoint
on the allow list, the signed headers include ``host``, ``x-amz-date`` and the server-id
header with our id, ``X-Amz-Date`` is within ``max_age`` of now, and the body is exactly
GetCallerIdentity; then send the same bytes to STS (as Vault does) and read ``Arn``,
``Account`` and ``UserId`` from its answer; finally claim the signature (one use: the
``claim`` callback, shared by every instance through NATS in the auth service). STS
checks the signature itself; a request signed for another service (another server id, or
another host) cannot be used here.

ARNs are matched by :func:`principal_arn`: an assumed role's session ARN
(``arn:aws:sts::ACC:assumed-role/ROLE/SESSION``) reads as the role's ARN
(``arn:aws:iam::ACC:role/ROLE``; STS does not say the role's path, so rules name roles
without it). Everything else is kept as STS returned it.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import fnmatch
import re
import secrets
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import parse_qsl, urlsplit

import aiohttp

SERVER_ID_HEADER: Final = "X-Fleetgate-Server-Id"
"""The header that names the auth service a request was signed for (signed with it)."""
NONCE_HEADER: Final = "X-Fleetgate-Nonce"
"""Random, signed with the request: two requests signed with the same credentials in the
same second (SigV4 dates have seconds) differ, so one use per signature does not refuse
the second (two agents on one instance role, a retry)."""

STS_BODY: Final = b"Action=GetCallerIdentity&Version=2011-06-15"
STS_PARAMS: Final = {"Action": "GetCallerIdentity", "Version": "2011-06-15"}
CONTENT_TYPE: Final = "application/x-www-form-urlencoded; charset=utf-8"
DEFAULT_MAX_AGE: Final = 300.0
"""How far a signed request's date may be from now (either way), by default."""
LONGEST_MAX_AGE: Final = 900.0
"""STS itself refuses a signature more than 15 minutes off: a longer window buys nothing."""
FRAMING_HEADERS: Final = frozenset(
    {"content-length", "transfer-encoding", "connection", "keep-alive", "te", "trailer",
     "upgrade", "expect", "proxy-authorization", "proxy-connection"}
)  # fmt: skip
"""Headers about the connection or the message's framing: the service's HTTP client
sets them itself, so a proof that signs or sends them is refused rather than forwarded."""
MAX_HEADERS: Final = 32
MAX_HEADER_BYTES: Final = 8192
MAX_ANSWER: Final = 64 * 1024
STS_TIMEOUT: Final = 10.0

_PRINTABLE: Final = re.compile(r"[ -~]*")
_TOKEN: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_NS: Final = "{https://sts.amazonaws.com/doc/2011-06-15/}"
_AMZ_DATE: Final = "%Y%m%dT%H%M%SZ"
_REGION: Final = r"[a-z]{2}(?:-[a-z]+)+-\d{1,2}"
STANDARD_HOSTS: Final = re.compile(
    rf"^(?:sts\.amazonaws\.com|sts(?:-fips)?\.{_REGION}\.amazonaws\.com"
    rf"|sts\.{_REGION}\.amazonaws\.com\.cn)$"
)
"""AWS's STS endpoints: global, regional, FIPS, China (HTTPS, port 443)."""
_AUTH: Final = re.compile(
    r"^AWS4-HMAC-SHA256 Credential=(?P<credential>[^,\s]+),\s*"
    r"SignedHeaders=(?P<signed>[a-z0-9;-]+),\s*Signature=(?P<signature>[0-9a-f]{64})$"
)
_ARN: Final = re.compile(
    r"^arn:(?P<partition>aws[a-z-]*):(?P<service>iam|sts)::(?P<account>\d{12}):(?P<resource>.+)$"
)


class IdentityRefused(Exception):
    """The proof is not acceptable; ``str()`` says why, for the person or program."""


class StsUnavailable(Exception):
    """STS could not be asked (network, timeout, 5xx): nothing is decided."""


@dataclass(frozen=True)
class AwsIdentity:
    """Who STS says signed the request."""

    account: str
    arn: str
    """As STS returned it (for an assumed role: the session's ARN)."""
    user_id: str

    @property
    def principal(self) -> str:
        """The ARN rules match: an assumed role's session ARN reads as the role's ARN."""
        return principal_arn(self.arn)


# -- ARNs and rules (pure) --------------------------------------------------------------


def principal_arn(arn: str) -> str:
    """``arn:aws:sts::ACC:assumed-role/ROLE/SESSION`` -> ``arn:aws:iam::ACC:role/ROLE``;
    any other ARN unchanged."""
    found = _ARN.fullmatch(arn)
    if found is None or found["service"] != "sts":
        return arn
    kind, _, rest = found["resource"].partition("/")
    role, sep, _session = rest.rpartition("/")
    if kind != "assumed-role" or not sep or not role:
        return arn
    return f"arn:{found['partition']}:iam::{found['account']}:role/{role}"


def arn_matches(pattern: str, identity: AwsIdentity) -> bool:
    """Whether a rule's ARN glob (``*``, ``?``; case-sensitive, as ARNs are) matches the
    principal ARN or the ARN STS returned (so a rule may also name sessions)."""
    return fnmatch.fnmatchcase(identity.principal, pattern) or fnmatch.fnmatchcase(
        identity.arn, pattern
    )


def account_matches(pattern: str | None, identity: AwsIdentity) -> bool:
    return pattern is None or fnmatch.fnmatchcase(identity.account, pattern)


# -- client side ------------------------------------------------------------------------


def sts_url(session: Any, region: str | None = None) -> tuple[str, str]:
    """The STS endpoint botocore would use (regional; ``AWS_ENDPOINT_URL`` or
    ``AWS_ENDPOINT_URL_STS`` when set) and its signing region."""
    session.set_config_variable("sts_regional_endpoints", "regional")
    region = region or session.get_config_variable("region") or "us-east-1"
    client = session.create_client("sts", region_name=region)
    try:
        return client.meta.endpoint_url.rstrip("/") + "/", client.meta.region_name
    finally:
        client.close()


def sign_identity_request(
    session: Any, server_id: str, *, region: str | None = None
) -> dict[str, Any]:
    """A signed GetCallerIdentity for the auth service ``server_id``, with the
    credentials of the botocore ``session``; :class:`IdentityRefused` when there are none."""
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.exceptions import BotoCoreError

    try:
        credentials = session.get_credentials()
        if credentials is None:
            raise IdentityRefused(
                "no AWS credentials found (environment, profile, instance profile, "
                "web identity or container role)"
            )
        frozen = credentials.get_frozen_credentials()
        url, signing_region = sts_url(session, region)
    except BotoCoreError as exc:
        raise IdentityRefused(f"cannot use the AWS credentials: {exc}") from None
    request = AWSRequest(
        method="POST",
        url=url,
        data=STS_BODY,
        headers={
            "Content-Type": CONTENT_TYPE,
            SERVER_ID_HEADER: server_id,
            NONCE_HEADER: secrets.token_hex(16),
        },
    )
    SigV4Auth(frozen, "sts", signing_region).add_auth(request)
    return {
        "method": "POST",
        "url": url,
        "headers": dict(request.headers.items()),
        "body": base64.b64encode(STS_BODY).decode(),
    }


# -- service side -----------------------------------------------------------------------


@dataclass(frozen=True)
class Checked:
    """A proof that passed the checks made before asking STS."""

    url: str
    headers: dict[str, str]
    body: bytes
    signature: str
    signed_at: dt.datetime


def _endpoint(url: str) -> tuple[str, str, int | None, str]:
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        raise IdentityRefused(f"url {url!r} has a bad port") from None
    return parts.scheme, (parts.hostname or ""), port, parts.path


def _allowed_url(url: str, overrides: Iterable[str]) -> bool:
    parts = urlsplit(url)
    if parts.query or parts.fragment or parts.username or parts.password:
        return False
    scheme, host, port, path = _endpoint(url)
    if path not in ("", "/"):
        return False
    if scheme == "https" and port in (None, 443) and STANDARD_HOSTS.fullmatch(host):
        return True
    for override in overrides:
        o_scheme, o_host, o_port, _ = _endpoint(override)
        if (scheme, host, port) == (o_scheme, o_host.lower(), o_port):
            return True
    return False


def check_proof(
    proof: Any,
    server_id: str,
    *,
    endpoints: Iterable[str] = (),
    max_age: float = DEFAULT_MAX_AGE,
    now: dt.datetime | None = None,
) -> Checked:
    """Every check that needs no network (see the module docstring), in the order a
    person would fix them; :class:`IdentityRefused` naming the first that fails."""
    if not isinstance(proof, Mapping):
        raise IdentityRefused("the proof is not an object {method, url, headers, body}")
    method, url, headers, body64 = (proof.get(k) for k in ("method", "url", "headers", "body"))
    if method != "POST":
        raise IdentityRefused(f"method {method!r}: the signed request must be a POST to STS")
    if not isinstance(url, str) or len(url) > 2048:
        raise IdentityRefused("url: missing or not a string")
    if not _allowed_url(url, endpoints):
        raise IdentityRefused(
            f"url {url!r} is not an STS endpoint this service accepts "
            "(https://sts[.REGION].amazonaws.com/, or the endpoint in its aws.sts_endpoints)"
        )
    if (
        not isinstance(headers, Mapping)
        or len(headers) > MAX_HEADERS
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items())
    ):
        raise IdentityRefused(f"headers: expected at most {MAX_HEADERS} names with string values")
    if sum(len(k) + len(v) for k, v in headers.items()) > MAX_HEADER_BYTES:
        raise IdentityRefused(f"headers: more than {MAX_HEADER_BYTES} bytes")
    lower: dict[str, str] = {}
    for name, value in headers.items():
        key = name.lower()
        if key in lower:
            raise IdentityRefused(f"headers: {name} is given twice")
        if not _PRINTABLE.fullmatch(name + value) or not _TOKEN.fullmatch(name):
            raise IdentityRefused(
                f"headers: {name!r} is not a header name with a printable ASCII value"
            )
        if key in FRAMING_HEADERS:
            raise IdentityRefused(
                f"headers: {name} may not be sent (the service frames the request)"
            )
        lower[key] = value
    if not isinstance(body64, str):
        raise IdentityRefused("body: missing (base64 of the signed request's body)")
    try:
        body = base64.b64decode(body64, validate=True)
    except (binascii.Error, ValueError):
        raise IdentityRefused("body: not base64") from None
    try:
        params = parse_qsl(body.decode("ascii"), keep_blank_values=True, strict_parsing=True)
    except (UnicodeDecodeError, ValueError):
        params = []
    if len(params) != len(STS_PARAMS) or dict(params) != STS_PARAMS:
        raise IdentityRefused(
            "body: the signed request must be exactly Action=GetCallerIdentity&Version=2011-06-15"
        )
    found = _AUTH.fullmatch(lower.get("authorization", ""))
    if found is None:
        raise IdentityRefused("headers: no AWS4-HMAC-SHA256 Authorization (the SigV4 signature)")
    scope = found["credential"].split("/")
    if len(scope) != 5 or scope[3] != "sts" or scope[4] != "aws4_request":
        raise IdentityRefused("Authorization: the request is not signed for STS")
    signed = found["signed"].split(";")
    missing = [h for h in ("host", "x-amz-date", SERVER_ID_HEADER.lower()) if h not in signed]
    if missing:
        raise IdentityRefused(
            f"the signature does not cover {', '.join(missing)}: sign the request with "
            f"{SERVER_ID_HEADER} (fleetgate login --aws does)"
        )
    not_sent = [h for h in signed if h != "host" and h not in lower]
    if not_sent:
        raise IdentityRefused(f"headers: signed but not sent: {', '.join(not_sent)}")
    if lower[SERVER_ID_HEADER.lower()] != server_id:
        raise IdentityRefused(
            f"{SERVER_ID_HEADER} is {lower[SERVER_ID_HEADER.lower()]!r}: the request was signed "
            f"for another service, not this one ({server_id!r})"
        )
    netloc = urlsplit(url).netloc
    if "host" in lower and lower["host"].lower() != netloc.lower():
        raise IdentityRefused(f"Host {lower['host']!r} is not the host of the url ({netloc})")
    try:
        signed_at = dt.datetime.strptime(lower["x-amz-date"], _AMZ_DATE).replace(tzinfo=dt.UTC)
    except ValueError:
        raise IdentityRefused("X-Amz-Date: not a date (YYYYMMDDTHHMMSSZ)") from None
    now = now or dt.datetime.now(dt.UTC)
    off = (now - signed_at).total_seconds()
    if abs(off) > max_age:
        when = "old" if off > 0 else "in the future"
        raise IdentityRefused(
            f"the signed request is {int(abs(off))}s {when}; it must be signed within "
            f"{int(max_age)}s of the service's clock (sign it just before sending; "
            "check the clocks)"
        )
    # STS gets the signed headers and the signature only (no hop-by-hop surprises).
    sent = {*signed, "authorization"} - {"host"}
    forward = {k: v for k, v in headers.items() if k.lower() in sent}
    forward["Host"] = netloc
    return Checked(url, forward, body, found["signature"], signed_at)


def parse_sts_answer(status: int, text: bytes) -> AwsIdentity:
    """The identity in a GetCallerIdentity answer; :class:`IdentityRefused` with STS's
    error for a 4xx; :class:`StsUnavailable` for anything else."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError:
        root = None
    if status == 200 and root is not None:
        result = root.find(f"{_NS}GetCallerIdentityResult")
        if result is None:
            result = root.find("GetCallerIdentityResult")
        ns = _NS if result is not None and result.tag.startswith("{") else ""
        if result is not None:
            arn = result.findtext(f"{ns}Arn") or ""
            account = result.findtext(f"{ns}Account") or ""
            user_id = result.findtext(f"{ns}UserId") or ""
            if arn and account:
                return AwsIdentity(account=account, arn=arn, user_id=user_id)
        raise StsUnavailable("STS answered 200 without an identity")
    if 400 <= status < 500:
        code = message = ""
        if root is not None:
            code = next((e.text or "" for e in root.iter() if e.tag.endswith("Code")), "")
            message = next((e.text or "" for e in root.iter() if e.tag.endswith("Message")), "")
        detail = f"{code}: {message}" if code or message else f"HTTP {status}"
        raise IdentityRefused(f"STS refused the signed request ({detail})")
    raise StsUnavailable(f"STS answered HTTP {status}")


Claim = Callable[[str, dt.datetime], Awaitable[bool]]
"""``claim(signature, signed_at)``: True the first time a signature is claimed."""


async def verify_identity_request(
    proof: Any,
    server_id: str,
    *,
    claim: Claim,
    endpoints: Iterable[str] = (),
    max_age: float = DEFAULT_MAX_AGE,
    http: aiohttp.ClientSession | None = None,
    now: dt.datetime | None = None,
) -> AwsIdentity:
    """Who signed ``proof`` (see the module docstring). Raises :class:`IdentityRefused`
    (the reason for the caller) or :class:`StsUnavailable` (try again later)."""
    checked = check_proof(proof, server_id, endpoints=endpoints, max_age=max_age, now=now)
    own = http is None
    session = http or aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=STS_TIMEOUT))
    try:
        async with session.post(
            checked.url, data=checked.body, headers=checked.headers, allow_redirects=False
        ) as resp:
            answer = await resp.content.read(MAX_ANSWER + 1)
            status = resp.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        why = str(exc) or type(exc).__name__
        raise StsUnavailable(f"cannot reach STS at {checked.url}: {why}") from None
    finally:
        if own:
            await session.close()
    if len(answer) > MAX_ANSWER:
        raise StsUnavailable("STS's answer is too large")
    identity = parse_sts_answer(status, answer)
    if not await claim(checked.signature, checked.signed_at):
        raise IdentityRefused("this signed request was used before: sign a new one for each login")
    return identity
