"""What every process says about a failed AWS call: ``<what>: <Code>: <message>``.

Discovery, the agent's IAM logins and managed users each map AWS failures into their
own error classes (what a failure *means* differs per caller); the reason text and the
code a decision is taken on come from here, so they read the same everywhere.
"""

from __future__ import annotations

from typing import Final

import botocore.exceptions

NO_CREDENTIALS: Final = (
    botocore.exceptions.NoCredentialsError,
    botocore.exceptions.PartialCredentialsError,
)
"""botocore's ways of saying the credential chain found nothing usable."""

DENIED_CODES: Final = frozenset(
    {
        "AccessDenied",
        "AccessDeniedException",
        "UnauthorizedOperation",
        "UnrecognizedClientException",
        "InvalidClientTokenId",
        "ExpiredToken",
        "ExpiredTokenException",
        "SignatureDoesNotMatch",
        "InvalidSignatureException",
    }
)
"""Codes meaning the caller's permissions or credentials are wrong."""

MAX_MESSAGE: Final = 256


def error_code(exc: BaseException) -> str:
    """The AWS error code of a ``ClientError`` (``AccessDeniedException``), else ""."""
    if isinstance(exc, botocore.exceptions.ClientError):
        return str(exc.response.get("Error", {}).get("Code", "Unknown"))
    return ""


def reason(exc: BaseException, what: str) -> str:
    """One line for ``exc``, raised while doing ``what`` (e.g. "DescribeClusters in
    us-east-1"): ``what: Code: message`` for an AWS answer, the endpoint for an
    unreachable AWS, else the exception's type and text."""
    if isinstance(exc, botocore.exceptions.ClientError):
        message = " ".join(str(exc.response.get("Error", {}).get("Message", "")).split())
        code = error_code(exc)
        return f"{what}: {code}: {message[:MAX_MESSAGE]}" if message else f"{what}: {code}"
    if isinstance(exc, botocore.exceptions.EndpointConnectionError):
        return f"{what}: cannot reach AWS at {exc.kwargs.get('endpoint_url', '?')}"
    if isinstance(exc, botocore.exceptions.BotoCoreError | OSError | TimeoutError):
        return f"{what}: {exc}"
    return f"{what}: {type(exc).__name__}: {exc}"
