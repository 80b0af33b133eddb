"""AWS failures as fetch errors, mapped at the seam.

FetchError                 a fetcher could not complete; it changes nothing it owns
├── FetchForbidden         access denied / bad or expired credentials (fix the policy)
├── FetchThrottled         still throttled after botocore's retries
├── NoCredentials          no credentials anywhere in the chain
└── FetchFailed            anything else: network, endpoint, server errors
"""

from __future__ import annotations

from fleetgate.awserrors import DENIED_CODES, NO_CREDENTIALS, error_code, reason

FORBIDDEN_CODES = DENIED_CODES
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
    if isinstance(exc, NO_CREDENTIALS):
        return NoCredentials(NO_CREDENTIALS_HELP)
    code, text = error_code(exc), reason(exc, what)
    if code in FORBIDDEN_CODES:
        return FetchForbidden(text)
    if code in THROTTLED_CODES:
        return FetchThrottled(text)
    return FetchFailed(text)


def outcome_of(error: FetchError) -> str:
    """The ``outcome`` label of a failed AWS call: throttled, forbidden or failed."""
    if isinstance(error, FetchThrottled):
        return "throttled"
    if isinstance(error, FetchForbidden | NoCredentials):
        return "forbidden"
    return "failed"
