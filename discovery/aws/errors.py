"""AWS failures as fetch errors, mapped at the seam.

FetchError                 a fetcher could not complete; it changes nothing it owns
├── FetchForbidden         access denied / bad or expired credentials (fix the policy)
├── FetchThrottled         still throttled after botocore's retries
├── NoCredentials          no credentials anywhere in the chain
└── FetchFailed            anything else: network, endpoint, server errors
"""

from __future__ import annotations

import botocore.exceptions

FORBIDDEN_CODES = frozenset(
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
THROTTLED_CODES = frozenset(
    {"Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequestsException"}
)

NO_CREDENTIALS_HELP = (
    "no AWS credentials found: looked in the environment (AWS_ACCESS_KEY_ID/"
    "AWS_SECRET_ACCESS_KEY), the shared files (~/.aws/credentials and ~/.aws/config, "
    "profile from AWS_PROFILE), web identity (AWS_WEB_IDENTITY_TOKEN_FILE) and instance "
    "metadata; provide them one of those ways"
)


class FetchError(Exception):
    """A fetcher could not complete."""


class FetchForbidden(FetchError):
    """Permissions or credentials are wrong: nothing will change until someone fixes them."""


class FetchThrottled(FetchError):
    """AWS kept throttling after retries."""


class NoCredentials(FetchError):
    """No credentials in the chain."""


class FetchFailed(FetchError):
    """Network, endpoint or server failure."""


def map_error(exc: Exception, what: str) -> FetchError:
    """Our error for ``exc``, raised while doing ``what`` (e.g. "DescribeClusters in us-east-1")."""
    if isinstance(exc, FetchError):
        return exc
    if isinstance(
        exc, botocore.exceptions.NoCredentialsError | botocore.exceptions.PartialCredentialsError
    ):
        return NoCredentials(NO_CREDENTIALS_HELP)
    if isinstance(exc, botocore.exceptions.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", "Unknown"))
        message = str(error.get("Message", ""))[:256]
        text = f"{what}: {code}: {message}" if message else f"{what}: {code}"
        if code in FORBIDDEN_CODES:
            return FetchForbidden(text)
        if code in THROTTLED_CODES:
            return FetchThrottled(text)
        return FetchFailed(text)
    if isinstance(exc, botocore.exceptions.EndpointConnectionError):
        return FetchFailed(f"{what}: cannot reach AWS at {exc.kwargs.get('endpoint_url', '?')}")
    if isinstance(exc, botocore.exceptions.BotoCoreError | OSError | TimeoutError):
        return FetchFailed(f"{what}: {exc}")
    return FetchFailed(f"{what}: {type(exc).__name__}: {exc}")
