"""``fleetgate auth|users|roles|login|status`` and ``fleetgate db logout``."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml

from bus import Bus
from bus.access import (
    Role,
    delete_aws_rule,
    delete_role,
    delete_user,
    get_aws_rule,
    get_role,
    get_user,
    list_aws_rules,
    list_roles,
    list_users,
    put_role,
    role_document,
)
from bus.audit import ensure_audit_stream, publish_event
from bus.aws_logins import provision_aws_logins
from bus.errors import BusError
from bus.settings import NATS_HELP, resolve_nats
from fleetgate import aio
from fleetgate.cli.errors import UsageError
from fleetgate.cli.output import add_format, print_json
from fleetgate.cli.tables import print_table
from fleetgate.config import ConfigError, load_model, read_yaml
from fleetgate.durations import format_duration, parse_duration

if TYPE_CHECKING:
    from client.login import LoginResult

T = TypeVar("T")
Common = Callable[[argparse.ArgumentParser], None]

DEFAULT_CA_DIR = "/var/lib/fleetgate/ca"
LIST_JSON = "json: a list of objects, one per row (default text: a table)"
LOGOUT_JSON = "one object with name (the database, or null for all) and removed (the paths)"
REMOVED_JSON = "one object with name and removed (true)"


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro``; our own errors become one ``fleetgate: error:`` line."""
    from client.login import LoginError
    from dbservice.access.ca import CAError, CertificateRejected
    from dbservice.auth.admin import AdminError

    try:
        return aio.run(coro)
    except (AdminError, CAError, CertificateRejected, LoginError) as exc:
        raise UsageError(str(exc)) from None


def _run_sync(call: Callable[[], T]) -> T:
    from client.login import LoginError

    try:
        return call()
    except LoginError as exc:
        raise UsageError(str(exc)) from None


def _duration(text: str) -> float:
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError("must be longer than zero")
    return seconds


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _read_password(from_stdin: bool, *, prompt: str = "Password: ") -> str:
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            raise UsageError("--password-stdin: no password on standard input")
        return password
    if not sys.stdin.isatty():
        raise UsageError("no terminal to ask for the password: use --password-stdin")
    return getpass.getpass(prompt)


def register(sub: Any, common: Common) -> None:
    _register_auth(sub, common)
    _register_users(sub, common)
    _register_roles(sub, common)
    login = sub.add_parser("login", help="log in at the auth service and keep a certificate")
    login.add_argument("--auth", required=True, help="the auth service, HOST:PORT")
    login.add_argument("--user", help="your user name (a person's login)")
    login.add_argument(
        "--aws",
        action="store_true",
        help="log in with this machine's AWS identity (programs: CI jobs, services in AWS); "
        "no password",
    )
    login.add_argument("--role", help="with --aws: only this role of the matching rule")
    login.add_argument("--region", help="with --aws: the STS region to sign for")
    login.add_argument("--password-stdin", action="store_true", help="read the password there")
    login.add_argument("--otp", help="one-time code, when your user has a second factor")
    login.add_argument("--ttl", type=_duration, help="ask for a shorter certificate, e.g. 1h")
    login.add_argument("--ca-file", help="CA certificate of the auth service (ca.crt)")
    login.add_argument("--ca-fingerprint", help="SHA256:... of that CA, as auth init printed")
    login.add_argument(
        "--format",
        default="text",
        choices=["text", "json"],
        help="json: one object with user, kind, roles, db_users, aws_arn, expires, serial, "
        "auth and ttl (seconds) (default text: one line)",
    )
    common(login)
    login.set_defaults(handler=_login)
    st = sub.add_parser("status", help="who you are logged in as, your roles, expiry")
    st.add_argument(
        "--format",
        default="text",
        choices=["text", "json"],
        help="json: one object with user, kind, roles, db_users, aws_arn, expires, serial, "
        "auth and expired (default text: one field a line)",
    )
    common(st)
    st.set_defaults(handler=_status)
    out = sub.add_parser(
        "logout",
        help="log out: remove your certificate, key and every database's kept state",
        description="Remove the login's certificate, key, fleet CA copy, profile and every "
        "database's kept state under FLEETGATE_HOME, and say what was removed. The pinned "
        "CA of the auth service stays (it is trust, not a credential). Safe to repeat.",
    )
    add_format(out, LOGOUT_JSON, text="a line per removed path")
    common(out)
    out.set_defaults(handler=_logout, name=None)


def register_logout(actions: Any, common: Common) -> None:
    """``fleetgate db logout [NAME]`` (added to the ``db`` group)."""
    out = actions.add_parser("logout", help="remove your credentials (or one database's)")
    out.add_argument("name", nargs="?", help="only this database's local state")
    add_format(out, LOGOUT_JSON, text="a line per removed path")
    common(out)
    out.set_defaults(handler=_logout)


# -- auth ------------------------------------------------------------------------------


def _register_auth(sub: Any, common: Common) -> None:
    group = sub.add_parser("auth", help="the fleet CA and the login service")
    actions = group.add_subparsers(dest="action", metavar="ACTION", required=True)
    init = actions.add_parser("init", help="create the fleet CA and publish its certificate")
    init.add_argument("--dir", required=True, help="CA directory on the auth host")
    init.add_argument("--force", action="store_true", help="replace an existing CA")
    init.add_argument("--nats", help=NATS_HELP)
    add_format(
        init,
        "one object with created (false: the existing CA was kept), dir, key, cert and fingerprint",
        text="what was done and what to give people",
    )
    common(init)
    init.set_defaults(handler=_auth_init)
    run = actions.add_parser("run", help="serve logins over HTTPS")
    run.add_argument("-c", "--config", required=True, help="auth service YAML config")
    run.add_argument("--nats", help=NATS_HELP)
    common(run)
    run.set_defaults(handler=_auth_run)
    sign = actions.add_parser("sign", help="issue a certificate for a program or a server")
    who = sign.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", help="a registered user (CI jobs, services)")
    who.add_argument("--host", type=_names, help="server names/addresses (agents): h1,10.0.0.1")
    sign.add_argument("--ttl", type=_duration, default=3600.0, help="validity (default 1h)")
    sign.add_argument("--out", required=True, help="directory for key.pem, cert.pem, ca.pem")
    sign.add_argument(
        "--ca-dir",
        default=os.environ.get("FLEETGATE_CA_DIR", DEFAULT_CA_DIR),
        help=f"CA directory (default: FLEETGATE_CA_DIR or {DEFAULT_CA_DIR})",
    )
    sign.add_argument("--nats", help=NATS_HELP)
    add_format(
        sign,
        "one object with user (null for --host), hosts (null for --user), roles, expires, "
        "ttl (seconds), capped and files (the paths written: key, certificate, CA)",
        text="who it is for, until when, and the files",
    )
    common(sign)
    sign.set_defaults(handler=_auth_sign)


def _auth_init(args: argparse.Namespace) -> int:
    from dbservice.auth.admin import init_ca

    async def go() -> int:
        async with await Bus.connect(resolve_nats(args.nats), name="fleetgate-admin") as bus:
            result = await init_ca(bus, Path(args.dir), force=args.force)
            await ensure_audit_stream(bus)
        if args.format == "json":
            print_json(
                {
                    "created": result.created,
                    "dir": args.dir,
                    "key": f"{args.dir}/ca.key",
                    "cert": str(result.cert_path),
                    "fingerprint": result.ca.fingerprint,
                }
            )
            return 0
        verb = "created" if result.created else "kept the existing"
        print(f"{verb} fleet CA in {args.dir} (key {args.dir}/ca.key, mode 0600)")
        print(f"published its certificate to the registry; fingerprint {result.ca.fingerprint}")
        print(
            f"give people {result.cert_path} (or the fingerprint): "
            "fleetgate login --auth HOST:PORT --user NAME --ca-file ca.crt"
        )
        return 0

    return _run(go())


def _auth_run(args: argparse.Namespace) -> int:
    from dbservice.auth.service import AuthConfig, run_auth

    config = load_model(AuthConfig, read_yaml(args.config), args.config)
    return _run(run_auth(config, nats_url=resolve_nats(args.nats, config.nats)))


def _auth_sign(args: argparse.Namespace) -> int:
    from dbservice.auth.admin import AdminError, load_ca, sign_event, sign_host, sign_user

    try:
        ca = load_ca(Path(args.ca_dir))
    except AdminError as exc:
        raise UsageError(f"{exc} (or pass --ca-dir)") from None
    out = Path(args.out)
    if args.host:
        try:
            files = sign_host(ca, args.host, args.ttl, out)
        except ValueError as exc:
            raise UsageError(f"--host: {exc}") from None
        if args.format == "json":
            print_json(
                {
                    "user": None,
                    "hosts": args.host,
                    "roles": [],
                    "expires": _cert_expires(files),
                    "ttl": args.ttl,
                    "capped": False,
                    "files": [str(f) for f in files],
                }
            )
            return 0
        print(f"server certificate for {', '.join(args.host)}, {format_duration(args.ttl)}:")
        print("\n".join(f"  {f}" for f in files))
        return 0

    async def go() -> int:
        async with await Bus.connect(resolve_nats(args.nats), name="fleetgate-admin") as bus:
            result = await sign_user(bus, ca, args.user, args.ttl, out)
            try:
                await ensure_audit_stream(bus)
                await publish_event(bus, sign_event(result, os.uname().nodename))
            except BusError as exc:
                print(f"fleetgate: warning: not audited: {exc}", file=sys.stderr)
        if args.format == "json":
            print_json(
                {
                    "user": result.identity.user,
                    "hosts": None,
                    "roles": list(result.identity.roles),
                    "expires": result.identity.model_dump(mode="json")["expires"],
                    "ttl": result.ttl,
                    "capped": result.capped,
                    "files": [str(f) for f in result.files],
                }
            )
            return 0
        capped = " (capped by the user's roles)" if result.capped else ""
        print(
            f"certificate for {result.identity.user} "
            f"(roles: {', '.join(result.identity.roles) or 'none'}) "
            f"until {result.identity.expires:%Y-%m-%d %H:%M:%SZ}{capped}:"
        )
        print("\n".join(f"  {f}" for f in result.files))
        return 0

    return _run(go())


def _cert_expires(files: tuple[Path, ...]) -> str:
    """When the certificate just written (``cert.pem``, the second file) expires."""
    from dbservice.access.ca import load_certs

    [cert, *_] = load_certs(files[1].read_bytes())
    return cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")  # as identities show it


# -- users -----------------------------------------------------------------------------


def _register_users(sub: Any, common: Common) -> None:
    group = sub.add_parser("users", help="manage users (admins, on the bus)")
    actions = group.add_subparsers(dest="action", metavar="ACTION", required=True)
    add = actions.add_parser("add", help="add a user")
    add.add_argument("name")
    add.add_argument("--roles", type=_names, required=True, help="r1,r2")
    add.add_argument("--db-users", type=_names, default=[], help="for {{internal.db_users}}")
    add.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from standard input (without it, the user can only get "
        "certificates from auth sign)",
    )
    add.add_argument("--totp", action="store_true", help="require a one-time code at login")
    add.add_argument("--replace", action="store_true", help="replace an existing user")
    ls = actions.add_parser("ls", help="list users")
    ls.add_argument("--format", default="text", choices=["text", "json"], help=LIST_JSON)
    rm = actions.add_parser("rm", help="remove a user")
    rm.add_argument("name")
    add_aws = actions.add_parser(
        "add-aws", help="let programs with a matching AWS identity log in as NAME (login --aws)"
    )
    add_aws.add_argument("name", help="the fleetgate identity their certificates name")
    add_aws.add_argument(
        "--arn",
        action="append",
        required=True,
        help="ARN glob, e.g. 'arn:aws:iam::123456789012:role/ci-*' (an assumed role's "
        "session matches its role's ARN); repeat for several",
    )
    add_aws.add_argument("--account", help="the AWS account id it must also be in")
    add_aws.add_argument("--roles", type=_names, required=True, help="r1,r2")
    add_aws.add_argument("--db-users", type=_names, default=[], help="for {{internal.db_users}}")
    add_aws.add_argument("--ttl", type=_duration, help="longest certificate (roles cap it too)")
    add_aws.add_argument("--replace", action="store_true", help="replace an existing rule")
    ls_aws = actions.add_parser("ls-aws", help="list the AWS identity rules")
    ls_aws.add_argument("--format", default="text", choices=["text", "json"], help=LIST_JSON)
    rm_aws = actions.add_parser("rm-aws", help="remove an AWS identity rule")
    rm_aws.add_argument("name")
    add_format(
        add,
        "one object with name, roles, db_users, password and totp (booleans: how the user "
        "logs in) and totp_uri (the one-time code secret, shown only now; null without "
        "--totp)",
        text="the user, its roles and how it logs in",
    )
    add_format(rm, REMOVED_JSON)
    add_format(
        add_aws,
        "the rule as one object, as users ls-aws --format json shows it (name, arns, "
        "account, roles, db_users, ttl)",
    )
    add_format(rm_aws, REMOVED_JSON)
    for parser, handler in (
        (add, _users_add),
        (ls, _users_ls),
        (rm, _users_rm),
        (add_aws, _users_add_aws),
        (ls_aws, _users_ls_aws),
        (rm_aws, _users_rm_aws),
    ):
        parser.add_argument("--nats", help=NATS_HELP)
        common(parser)
        parser.set_defaults(handler=handler)


def _users_add(args: argparse.Namespace) -> int:
    from dbservice.auth.admin import add_user
    from dbservice.auth.passwords import hash_password, new_totp_secret, totp_uri

    password_hash = None
    if args.password_stdin:
        try:
            password_hash = hash_password(_read_password(True))
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    totp = new_totp_secret() if args.totp else None

    async def go() -> int:
        async with await Bus.connect(resolve_nats(args.nats), name="fleetgate-admin") as bus:
            user = await add_user(
                bus,
                args.name,
                args.roles,
                args.db_users,
                password_hash=password_hash,
                totp_secret=totp,
                replace=args.replace,
            )
        if args.format == "json":
            print_json(
                {
                    "name": user.name,
                    "roles": list(user.roles),
                    "db_users": list(user.db_users),
                    "password": password_hash is not None,
                    "totp": totp is not None,
                    "totp_uri": totp_uri(totp, user.name) if totp else None,
                }
            )
            return 0
        print(f"user {user.name} with roles {', '.join(user.roles)}")
        if password_hash is None:
            print("no password: certificates only from fleetgate auth sign --user", user.name)
        if totp:
            print(
                f"one-time codes: add this to an authenticator app:\n  {totp_uri(totp, user.name)}"
            )
        return 0

    return _run(go())


def _users_ls(args: argparse.Namespace) -> int:
    async def go() -> int:
        async with await Bus.connect(resolve_nats(args.nats), name="fleetgate-admin") as bus:
            users = await list_users(bus)
        if args.format == "json":
            rows = [
                {
                    "name": u.name,
                    "roles": list(u.roles),
                    "db_users": list(u.db_users),
                    "password": u.password_hash is not None,
                    "totp": u.totp_secret is not None,
                }
                for u in users
            ]
            print(json.dumps(rows, indent=2))
            return 0
        table = [("NAME", "ROLES", "DB USERS", "LOGIN")]
        for u in users:
            login = "password" if u.password_hash else "sign only"
            login += "+totp" if u.totp_secret else ""
            table.append((u.name, ",".join(u.roles), ",".join(u.db_users), login))
        print_table(table)
        return 0

    return _run(go())


def _users_rm(args: argparse.Namespace) -> int:
    async def go() -> int:
        async with await Bus.connect(resolve_nats(args.nats), name="fleetgate-admin") as bus:
            if await get_user(bus, args.name) is None:
                raise UsageError(f"no user {args.name!r} (see fleetgate users ls)")
            await delete_user(bus, args.name)
        if args.format == "json":
            print_json({"name": args.name, "removed": True})
            return 0
        print(f"removed user {args.name}; certificates already issued last until they expire")
        return 0

    return _run(go())


def _users_add_aws(args: argparse.Namespace) -> int:
    from dbservice.auth.admin import add_aws_rule

    async def go() -> int:
        async with await Bus.connect(resolve_nats(args.nats), name="fleetgate-admin") as bus:
            rule = await add_aws_rule(
                bus,
                args.name,
                args.arn,
                args.roles,
                account=args.account,
                db_users=args.db_users,
                ttl=args.ttl,
                replace=args.replace,
            )
        if args.format == "json":
            print_json(rule.model_dump(mode="json"))
            return 0
        account = f" in account {rule.account}" if rule.account else ""
        print(
            f"AWS identities matching {', '.join(rule.arns)}{account} log in as {rule.name} "
            f"with roles {', '.join(rule.roles)} (fleetgate login --aws)"
        )
        return 0

    return _run(go())


def _users_ls_aws(args: argparse.Namespace) -> int:
    async def go() -> int:
        async with await Bus.connect(resolve_nats(args.nats), name="fleetgate-admin") as bus:
            await provision_aws_logins(bus)
            rules = await list_aws_rules(bus)
        if args.format == "json":
            print(json.dumps([r.model_dump(mode="json") for r in rules], indent=2))
            return 0
        table = [("NAME", "ARNS", "ACCOUNT", "ROLES", "MAX TTL")]
        for r in rules:
            ttl = format_duration(r.ttl) if r.ttl else "roles'"
            table.append((r.name, " ".join(r.arns), r.account or "*", ",".join(r.roles), ttl))
        print_table(table)
        return 0

    return _run(go())


def _users_rm_aws(args: argparse.Namespace) -> int:
    async def go() -> int:
        async with await Bus.connect(resolve_nats(args.nats), name="fleetgate-admin") as bus:
            await provision_aws_logins(bus)
            if await get_aws_rule(bus, args.name) is None:
                raise UsageError(f"no AWS rule {args.name!r} (see fleetgate users ls-aws)")
            await delete_aws_rule(bus, args.name)
        if args.format == "json":
            print_json({"name": args.name, "removed": True})
            return 0
        print(f"removed AWS rule {args.name}; certificates already issued last until they expire")
        return 0

    return _run(go())


# -- roles -----------------------------------------------------------------------------


def _register_roles(sub: Any, common: Common) -> None:
    group = sub.add_parser("roles", help="manage roles (admins, on the bus)")
    actions = group.add_subparsers(dest="action", metavar="ACTION", required=True)
    create = actions.add_parser("create", help="create a role from a YAML file")
    create.add_argument("-f", "--file", required=True, help="role YAML (kind: role)")
    create.add_argument("--replace", action="store_true", help="replace an existing role")
    ls = actions.add_parser("ls", help="list roles")
    ls.add_argument(
        "--format",
        default="text",
        choices=["text", "json", "yaml"],
        help="json: a list of role objects; yaml: documents role create takes (default text: "
        "a table)",
    )
    rm = actions.add_parser("rm", help="remove a role")
    rm.add_argument("name")
    add_format(
        create,
        "one object with name and action (created or replaced)",
    )
    add_format(
        rm,
        "one object with name, removed (true) and still_named_by (the users whose roles "
        "still name it; it grants them nothing now)",
        text="a line, and a note naming the users that still name it",
    )
    for parser, handler in ((create, _roles_create), (ls, _roles_ls), (rm, _roles_rm)):
        parser.add_argument("--nats", help=NATS_HELP)
        common(parser)
        parser.set_defaults(handler=handler)


def load_role_file(path: str) -> Role:
    from dbservice.auth.admin import parse_role

    return parse_role(read_yaml(path), path)


def _roles_create(args: argparse.Namespace) -> int:
    role = load_role_file(args.file)

    async def go() -> int:
        async with await Bus.connect(resolve_nats(args.nats), name="fleetgate-admin") as bus:
            exists = await get_role(bus, role.name) is not None
            if exists and not args.replace:
                raise UsageError(f"role {role.name!r} exists already; pass --replace to change it")
            await put_role(bus, role)
        action = "replaced" if exists else "created"
        if args.format == "json":
            print_json({"name": role.name, "action": action})
            return 0
        print(f"{action} role {role.name}")
        return 0

    return _run(go())


def _roles_ls(args: argparse.Namespace) -> int:
    async def go() -> int:
        async with await Bus.connect(resolve_nats(args.nats), name="fleetgate-admin") as bus:
            roles = await list_roles(bus)
        docs = [role_document(r) for r in roles]
        if args.format == "json":
            print(json.dumps(docs, indent=2))
        elif args.format == "yaml":
            print(yaml.safe_dump_all(docs, sort_keys=False), end="")
        else:
            table = [("NAME", "ALLOW LABELS", "DB USERS", "MAX TTL")]
            for r in roles:
                labels = ", ".join(
                    f"{k}={v if isinstance(v, str) else '|'.join(v)}"
                    for k, v in r.allow.db_labels.items()
                )
                ttl = format_duration(r.options.max_session_ttl)
                table.append((r.name, labels, ",".join(r.allow.db_users), ttl))
            print_table(table)
        return 0

    return _run(go())


def _roles_rm(args: argparse.Namespace) -> int:
    async def go() -> int:
        async with await Bus.connect(resolve_nats(args.nats), name="fleetgate-admin") as bus:
            if await get_role(bus, args.name) is None:
                raise UsageError(f"no role {args.name!r} (see fleetgate roles ls)")
            holders = [u.name for u in await list_users(bus) if args.name in u.roles]
            await delete_role(bus, args.name)
        if args.format == "json":
            print_json({"name": args.name, "removed": True, "still_named_by": holders})
            return 0
        print(f"removed role {args.name}")
        if holders:
            print(f"note: still named by users {', '.join(holders)} (it grants them nothing now)")
        return 0

    return _run(go())


# -- login, status, logout ---------------------------------------------------------------


def _confirm(fingerprint: str) -> bool:
    if not sys.stdin.isatty():
        return False
    answer = input(f"The auth service presents CA {fingerprint}.\nTrust it? [y/N] ")
    return answer.strip().lower() in {"y", "yes"}


def _login(args: argparse.Namespace) -> int:
    from client.login import login

    if args.aws:
        return _login_aws(args)
    if args.role or args.region:
        raise UsageError("--role and --region go with --aws")
    if not args.user:
        raise UsageError("--user NAME is required (or --aws for a program with an AWS identity)")
    password = _read_password(args.password_stdin)
    result = _run(
        login(
            args.auth,
            args.user,
            password,
            totp=args.otp,
            ttl=args.ttl,
            ca_file=args.ca_file,
            ca_fingerprint=args.ca_fingerprint,
            confirm=None if args.password_stdin else _confirm,
        )
    )
    identity = result.identity
    if args.format == "json":
        return _print_login_json(result, args.auth)
    print(
        f"logged in as {identity.user} (roles: {', '.join(identity.roles) or 'none'}) "
        f"until {identity.expires:%Y-%m-%d %H:%M:%SZ}"
    )
    return 0


def _login_aws(args: argparse.Namespace) -> int:
    from client.login import login_aws

    if args.user or args.password_stdin or args.otp:
        raise UsageError("--aws logs in without --user, --password-stdin or --otp")
    result = _run(
        login_aws(
            args.auth,
            role=args.role,
            ttl=args.ttl,
            region=args.region,
            ca_file=args.ca_file,
            ca_fingerprint=args.ca_fingerprint,
            confirm=None,  # programs: trust only --ca-file, --ca-fingerprint or the pin
        )
    )
    identity = result.identity
    if args.format == "json":
        return _print_login_json(result, args.auth)
    print(
        f"logged in as {identity.user} with AWS identity {identity.aws_arn} "
        f"(roles: {', '.join(identity.roles) or 'none'}) "
        f"until {identity.expires:%Y-%m-%d %H:%M:%SZ}"
    )
    return 0


def _print_login_json(result: LoginResult, address: str) -> int:
    """The identity just stored, as ``status --format json`` shows it, with the
    certificate's lifetime; ``auth`` is the service as the stored login names it."""
    from client.login import status

    st = status(result.home)
    auth = st.auth if st is not None and st.auth else address
    doc = result.identity.model_dump(mode="json") | {"auth": auth, "ttl": result.ttl}
    print(json.dumps(doc, indent=2))
    return 0


def _status(args: argparse.Namespace) -> int:
    from client.login import status
    from dbservice.access.ca import CertificateRejected

    try:
        st = status()
    except (ValueError, OSError, CertificateRejected) as exc:
        raise ConfigError(f"stored credentials are unreadable ({exc}); log in again") from None
    if st is None:
        print("not logged in (fleetgate login --auth HOST:PORT --user NAME)", file=sys.stderr)
        return 1
    ident = st.identity
    if args.format == "json":
        doc = ident.model_dump(mode="json") | {"auth": st.auth, "expired": st.expired}
        print(json.dumps(doc, indent=2))
    else:
        state = "EXPIRED" if st.expired else "valid"
        print(f"user:      {ident.user} ({ident.kind})")
        print(f"roles:     {', '.join(ident.roles) or '(none)'}")
        print(f"db users:  {', '.join(ident.db_users) or '(none)'}")
        if ident.aws_arn:
            print(f"aws:       {ident.aws_arn}")
        print(f"expires:   {ident.expires:%Y-%m-%d %H:%M:%SZ} ({state})")
        print(f"auth:      {st.auth or '(unknown)'}")
    return 1 if st.expired else 0


def _logout(args: argparse.Namespace) -> int:
    from client.login import logout

    removed = _run_sync(lambda: logout(args.name))
    if args.format == "json":
        print_json({"name": args.name, "removed": [str(p) for p in removed]})
        return 0
    if not removed:
        print("nothing to remove" + (f" for {args.name}" if args.name else ""))
    for path in removed:
        print(f"removed {path}")
    return 0
