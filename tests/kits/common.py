"""Helpers every kind of test uses: the repository's root, the production NATS
config's passwords, AWS clients and the environment for the ``fleetgate`` command."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import boto3
import nkeys
import pytest
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.kits.natsauth import new_seed, public_key

ROOT = Path(__file__).resolve().parents[2]
"""The repository's top folder."""

NO_RETRY = Retry(NoBackoff(), 0)
"""``retry=`` for a redis-py client that expects a refusal: redis-py's default retries a
ConnectionError (an AuthenticationError is one) ten times with backoff, seconds per
refusal for the same answer."""
NO_RETRY_ASYNC = AsyncRetry(NoBackoff(), 0)
""":data:`NO_RETRY` for a ``redis.asyncio`` client."""

SAMPLE_NATS_CONF = ROOT / "deploy" / "nats" / "nats-server.conf"
"""The production NATS config; its users' passwords come from the environment."""


CALLOUT_SEED = new_seed(nkeys.PREFIX_BYTE_ACCOUNT)
"""The auth callout issuer of the tests' NATS servers (``FLEETGATE_NATS_CALLOUT_ISSUER``
is its public key): the seed an auth service's ``nats_callout`` is given."""


def sample_nats_passwords(monkeypatch: pytest.MonkeyPatch) -> None:
    """Set every ``FLEETGATE_NATS_<USER>_PASSWORD`` that :data:`SAMPLE_NATS_CONF` reads
    to ``pw-<user>``, and the callout issuer to :data:`CALLOUT_SEED`'s public key
    (nats-server refuses to start with one missing)."""
    text = SAMPLE_NATS_CONF.read_text()
    for var, user in set(re.findall(r"\$(FLEETGATE_NATS_(\w+)_PASSWORD)", text)):
        monkeypatch.setenv(var, f"pw-{user.lower()}")
    monkeypatch.setenv("FLEETGATE_NATS_CALLOUT_ISSUER", public_key(CALLOUT_SEED))


def boto(service: str, region: str = "us-east-1", **kwargs: object) -> object:
    """A boto3 client against the current environment (moto, when ``aws`` is in use)."""
    return boto3.client(service, region_name=region, **kwargs)


def assumed_role_env(role: str, session: str, account: str = "123456789012") -> dict[str, str]:
    """The AWS environment of a process that assumed ``role`` of ``account`` through STS
    (moto's, when ``aws`` is in use): its access key, secret key and session token."""
    sts: Any = boto("sts")
    arn = f"arn:aws:iam::{account}:role/{role}"
    c = sts.assume_role(RoleArn=arn, RoleSessionName=session)["Credentials"]
    return {
        "AWS_ACCESS_KEY_ID": c["AccessKeyId"],
        "AWS_SECRET_ACCESS_KEY": c["SecretAccessKey"],
        "AWS_SESSION_TOKEN": c["SessionToken"],
    }


def subprocess_env(**extra: str) -> dict[str, str]:
    """The current environment plus ``extra``, for running the ``fleetgate`` command."""
    env = dict(os.environ)
    env.update(extra)
    return env


def stopped_log(server: subprocess.Popen[str]) -> str:
    """Stop ``server`` (SIGTERM), wait for it and return what it wrote to its stderr (a
    pipe, in text mode)."""
    server.terminate()
    server.wait(10)
    assert server.stderr is not None
    log = server.stderr.read()
    server.stderr.close()
    return log


def spooled(directory: Path) -> bytes:
    """What an agent's audit spool holds now: its segments' bytes, in order. A segment
    the agent delivers and deletes while this reads counts as empty."""
    if not directory.exists():
        return b""
    held = []
    for path in sorted(directory.iterdir()):
        if path.name.startswith("seg-"):
            try:
                held.append(path.read_bytes())
            except FileNotFoundError:
                continue
    return b"".join(held)
