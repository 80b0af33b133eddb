"""How every process connects to NATS: one settings model (the ``nats:`` section of each
config file), the same environment variables everywhere, and what Bus.connect gets.

Layers, per setting: the ``--nats`` flag (servers only) beats the environment
(``FLEETGATE_NATS_*``) beats the config file. Credentials are one group: when the
environment names any kind (user, password file, NKey seed, .creds, token), the config
file's credentials are ignored as a whole, so the environment can switch kinds. Files
are read and checked by :func:`resolve_nats`, which raises ConfigError naming the setting
(and the variable it came from) and the fix; no message ever holds a secret.
docs/nats-client.md describes it for operators.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import ssl
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final
from urllib.parse import unquote, urlsplit

import nkeys
from pydantic import Field, ValidationError, field_validator, model_validator

from fleetgate.config import ConfigError, Strict, explain

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
START_WAIT: Final = 30.0
"""Seconds a service's start keeps trying to reach NATS, and JetStream to answer, before
it gives up (it may be starting beside them; the agent's ``nats.start_wait`` default)."""
NATS_HELP = (  # every command's --nats
    "NATS server URL(s), comma-separated (default: FLEETGATE_NATS_SERVERS or "
    "FLEETGATE_NATS_URL, else nats://127.0.0.1:4222; TLS and credentials: "
    "FLEETGATE_NATS_*, docs/nats-client.md)"
)

ENV_URL = "FLEETGATE_NATS_URL"
ENV_SERVERS = "FLEETGATE_NATS_SERVERS"
ENV_CA_FILE = "FLEETGATE_NATS_CA_FILE"
ENV_CERT_FILE = "FLEETGATE_NATS_CERT_FILE"
ENV_KEY_FILE = "FLEETGATE_NATS_KEY_FILE"
ENV_SERVER_NAME = "FLEETGATE_NATS_TLS_SERVER_NAME"
ENV_USER = "FLEETGATE_NATS_USER"
ENV_PASSWORD_FILE = "FLEETGATE_NATS_PASSWORD_FILE"
ENV_PASSWORD = "FLEETGATE_NATS_PASSWORD"
ENV_NKEY_SEED_FILE = "FLEETGATE_NATS_NKEY_SEED_FILE"
ENV_CREDS_FILE = "FLEETGATE_NATS_CREDS_FILE"
ENV_TOKEN_FILE = "FLEETGATE_NATS_TOKEN_FILE"
ENV_INBOX_PREFIX = "FLEETGATE_NATS_INBOX_PREFIX"

_TLS_ENV = {"ca_file": ENV_CA_FILE, "cert_file": ENV_CERT_FILE, "key_file": ENV_KEY_FILE}
_CREDENTIAL_ENV = {
    "user": ENV_USER,
    "password_file": ENV_PASSWORD_FILE,
    "nkey_seed_file": ENV_NKEY_SEED_FILE,
    "creds_file": ENV_CREDS_FILE,
    "token_file": ENV_TOKEN_FILE,
}
_SUBJECT_TOKEN = re.compile(r"^[^\s.*>]+(\.[^\s.*>]+)*$")


def redact_url(url: str) -> str:
    """Hide secrets in a URL that may be logged: ``nats://user:secret@h`` ->
    ``nats://user:***@h``, ``nats://token@h`` -> ``nats://***@h``."""
    return re.sub(
        r"//([^/@:]*)(:[^/@]*)?@",
        lambda m: f"//{m[1]}:***@" if m[2] else "//***@",
        url,
    )


def split_servers(value: str) -> list[str]:
    """``"nats://a:4222, nats://b:4222"`` -> the two URLs."""
    return [server.strip() for server in value.split(",") if server.strip()]


def url_user(url: str) -> str | None:
    """The user a NATS URL logs in as (``nats://user:secret@h`` -> ``user``); None for
    a URL without credentials or with a token (``nats://token@h``). Of a comma-separated
    list of servers, the first one that names a user."""
    for server in url.split(","):
        try:
            parts = urlsplit(server.strip())
        except ValueError:
            continue
        if parts.username is not None and parts.password is not None:
            return unquote(parts.username)
    return None


def url_login(servers: Sequence[str]) -> tuple[str, str] | None:
    """The user and password inside the first server URL that has both, or None."""
    for server in servers:
        try:
            parts = urlsplit(server.strip())
        except ValueError:
            continue
        if parts.username is not None and parts.password is not None:
            return unquote(parts.username), unquote(parts.password)
    return None


def inbox_prefix(user: str | None) -> str:
    """The subject prefix of every reply this client receives: ``_INBOX_<user>``, so that
    deploy/nats/nats-server.conf lets each user subscribe to its own replies only
    (``_INBOX_<user>.>``), never to another user's. A character NATS does not allow in
    a subject token (or that would be a wildcard) becomes ``_``. Without a user (no
    authentication, or a token), NATS's default ``_INBOX``. An agent's own user
    (``agent-<host_id>``, admitted by the auth callout) gets ``_INBOX_agents.<host_id>``:
    one prefix token for every agent, so that a leaf node's link may carry all agents'
    replies (NATS wildcards match whole tokens only) while each agent reads its own."""
    if not user:
        return "_INBOX"
    if user.startswith(AGENT_USER_PREFIX) and len(user) > len(AGENT_USER_PREFIX):
        return AGENTS_INBOX + "." + _token(user[len(AGENT_USER_PREFIX) :])
    return "_INBOX_" + _token(user)


AGENT_USER_PREFIX: Final = "agent-"
"""The NATS user of one agent is ``agent-<host_id>`` (the fixed users never start so)."""

AGENTS_INBOX: Final = "_INBOX_agents"


def _token(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)


def _check_server(url: str) -> str:
    try:
        parts = urlsplit(url if "://" in url else f"nats://{url}")
        port = parts.port
    except ValueError:
        raise ValueError(f"{redact_url(url)!r} is not a server URL (nats://host:4222)") from None
    if parts.scheme not in ("nats", "tls"):
        raise ValueError(
            f"{redact_url(url)!r}: use nats:// or tls:// (example: tls://nats-1.internal:4222)"
        )
    if not parts.hostname or (port is None and parts.netloc.endswith(":")):
        raise ValueError(f"{redact_url(url)!r} names no host (example: nats://nats-1:4222)")
    return url


class NatsTLS(Strict):
    """TLS to NATS. With this section every server is reached over TLS (a ``nats://``
    URL is treated as ``tls://``), checked against ``ca_file`` (else the system roots)."""

    ca_file: Path | None = None
    """PEM bundle of the CA(s) that signed the NATS servers' certificates."""
    cert_file: Path | None = None
    """Client certificate for mutual TLS (servers with ``verify: true``); with key_file."""
    key_file: Path | None = None
    """The client certificate's private key (PEM, not encrypted)."""
    server_name: str | None = None
    """Name to check the servers' certificates against instead of each URL's host."""
    handshake_first: bool = False
    """Start TLS before the server's greeting (nats-server ``handshake_first: true``):
    no byte crosses the network in the clear, not even the greeting."""

    @model_validator(mode="after")
    def _pair(self) -> NatsTLS:
        if (self.cert_file is None) != (self.key_file is None):
            have, missing = (
                ("cert_file", "key_file") if self.key_file is None else ("key_file", "cert_file")
            )
            raise ValueError(
                f"{have} is set without {missing}: mutual TLS needs both the client "
                "certificate and its key (or neither)"
            )
        return self


class NatsSettings(Strict):
    """The ``nats:`` section of every config file (discovery, agent, auth service)."""

    servers: list[str] = Field(default_factory=list, repr=False)
    """The NATS servers to connect to (``nats://host:4222`` or ``tls://host:4222``);
    the client picks one and fails over to the others. Default nats://127.0.0.1:4222."""
    url: str | None = Field(default=None, repr=False)
    """Older form of ``servers``: one URL or a comma-separated list (set one of the two).
    A password inside it (``nats://agent:secret@h``) still works but belongs in
    ``password_file``."""
    tls: NatsTLS | None = None
    user: str | None = None
    """User name; its password from ``password_file`` or FLEETGATE_NATS_PASSWORD."""
    password_file: Path | None = None
    nkey_seed_file: Path | None = None
    """File holding the user's NKey seed (``SU...``)."""
    creds_file: Path | None = None
    """A ``.creds`` file (user JWT and NKey seed, as ``nsc`` writes it)."""
    token_file: Path | None = None
    """File holding an authentication token."""
    inbox_prefix: str | None = None
    """Subject prefix of the replies this client gets. Default ``_INBOX_<user>``: the
    user name, the .creds JWT's name, or the NKey's public key (docs/nats-client.md)."""

    @field_validator("servers")
    @classmethod
    def _servers(cls, servers: list[str]) -> list[str]:
        return [_check_server(server.strip()) for server in servers]

    @field_validator("url")
    @classmethod
    def _url(cls, url: str | None) -> str | None:
        if url is not None:
            for server in split_servers(url):
                _check_server(server)
        return url

    @field_validator("inbox_prefix")
    @classmethod
    def _inbox(cls, prefix: str | None) -> str | None:
        if prefix is not None and not _SUBJECT_TOKEN.match(prefix):
            raise ValueError(
                f"{prefix!r} is not a subject prefix: no spaces, wildcards (* >) or empty "
                "tokens (example: _INBOX_agent)"
            )
        return prefix

    @model_validator(mode="after")
    def _check(self) -> NatsSettings:
        if self.servers and self.url:
            raise ValueError("set servers or url, not both (url is the older form)")
        kinds = self.credential_kinds()
        if len(kinds) > 1:
            raise ValueError(
                f"{' and '.join(kinds)} are set: choose one kind of NATS credentials "
                "(user + password_file, nkey_seed_file, creds_file or token_file)"
            )
        if self.password_file is not None and self.user is None:
            raise ValueError("password_file is set without user: set the user it belongs to")
        return self

    def server_list(self) -> list[str]:
        if self.servers:
            return list(self.servers)
        return split_servers(self.url) if self.url else []

    def credential_kinds(self) -> list[str]:
        """The kinds of credentials set (more than one is an error)."""
        kinds = []
        if self.user is not None:
            kinds.append("user")
        for name in ("nkey_seed_file", "creds_file", "token_file"):
            if getattr(self, name) is not None:
                kinds.append(name)
        if any(url_user(server) or _url_token(server) for server in self.server_list()):
            kinds.append("a password in the server URL")
        return kinds


def _url_token(url: str) -> bool:
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    return parts.username is not None and parts.password is None


@dataclass(frozen=True)
class NatsConnection:
    """Everything Bus.connect needs, files read and checked: what :func:`resolve_nats`
    returns. Never printed whole: :attr:`shown` is the redacted server list."""

    servers: tuple[str, ...] = field(repr=False)
    settings: NatsSettings = field(repr=False)
    """The settings after every layer (flag, environment, file): JSON-safe, no secret
    besides one a URL may hold (a listener process gets them from its leader)."""
    inbox_prefix: str
    tls: ssl.SSLContext | None = None
    tls_hostname: str | None = None
    tls_handshake_first: bool = False
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    nkey_seed_file: str | None = None
    creds_file: str | None = None

    def __repr__(self) -> str:
        return f"NatsConnection({self.shown}, inbox_prefix={self.inbox_prefix!r})"

    @property
    def shown(self) -> str:
        return ",".join(redact_url(server) for server in self.servers)

    def new_tls(self) -> tuple[ssl.SSLContext, Callable[[], bool]] | None:
        """A TLS context of its own for one client (None without TLS), and a check:
        whether a TLS handshake completed since the check was last asked (each
        connection to a server is preceded by one, when TLS started)."""
        if self.settings.tls is None:
            return None
        context = _tls_context(self.settings.tls, lambda name: f"nats.tls.{name}")
        done = [False]

        class Watched(ssl.SSLObject):
            def do_handshake(self) -> None:
                super().do_handshake()
                done[0] = True

        context.sslobject_class = Watched

        def handshake_done() -> bool:
            seen, done[0] = done[0], False
            return seen

        return context, handshake_done

    @classmethod
    def from_url(cls, url: str) -> NatsConnection:
        """A connection given by URL alone (a list, maybe with a password inside), as
        tests and the sandbox use."""
        return resolve_nats(url, NatsSettings(), env={})


def _layer(
    flag: str | None, configured: NatsSettings, env: Mapping[str, str]
) -> tuple[NatsSettings, dict[str, str]]:
    """Apply the environment and the flag over the config file's settings; return them
    and, per setting, where it came from (for error messages)."""
    data = configured.model_dump(exclude_none=True)
    source = {name: f"nats.{name}" for name in data}
    if data.get("tls"):
        source |= {f"tls.{name}": f"nats.tls.{name}" for name in data["tls"]}
    if env.get(ENV_URL) and env.get(ENV_SERVERS):
        raise ConfigError(f"{ENV_URL} and {ENV_SERVERS} are both set: set only {ENV_SERVERS}")
    for shown, value in (
        (ENV_SERVERS, env.get(ENV_SERVERS)),
        (ENV_URL, env.get(ENV_URL)),
        ("--nats", flag),
    ):
        if value:
            data.pop("url", None)
            data["servers"] = split_servers(value)
            source["servers"] = shown
    tls_env = {name: env[var] for name, var in _TLS_ENV.items() if env.get(var)}
    if env.get(ENV_SERVER_NAME):
        tls_env["server_name"] = env[ENV_SERVER_NAME]
    if tls_env:
        data["tls"] = {**data.get("tls", {}), **tls_env}
        for name in tls_env:
            source[f"tls.{name}"] = _TLS_ENV.get(name, ENV_SERVER_NAME)
    credentials = {name: env[var] for name, var in _CREDENTIAL_ENV.items() if env.get(var)}
    if credentials:
        for name in _CREDENTIAL_ENV:
            data.pop(name, None)
        data |= credentials
        source |= {name: _CREDENTIAL_ENV[name] for name in credentials}
    if env.get(ENV_INBOX_PREFIX):
        data["inbox_prefix"] = env[ENV_INBOX_PREFIX]
        source["inbox_prefix"] = ENV_INBOX_PREFIX
    try:
        return type(configured).model_validate(data), source
    except ValidationError as exc:
        where = ", ".join(sorted(set(source.values()))) or "defaults"
        raise explain(exc, f"NATS settings (from {where})") from None


def resolve_nats(
    flag: str | None = None,
    configured: NatsSettings | None = None,
    *,
    env: Mapping[str, str] | None = None,
) -> NatsConnection:
    """The NATS connection to make: ``flag`` (``--nats``: servers) over the environment
    over ``configured`` (the config file's ``nats:`` section); every file read and
    checked. ConfigError names the setting and what to do."""
    env = os.environ if env is None else env
    settings, source = _layer(flag, configured or NatsSettings(), env)
    servers = [
        server if "://" in server else f"nats://{server}"
        for server in settings.server_list() or [DEFAULT_NATS_URL]
    ]

    def where(name: str) -> str:
        return source.get(name, f"nats.{name}")

    tls: ssl.SSLContext | None = None
    if settings.tls is not None:
        tls = _tls_context(settings.tls, lambda name: where(f"tls.{name}"))
        servers = [re.sub(r"^nats://", "tls://", server) for server in servers]

    password = token = None
    user = settings.user
    nkey_seed = creds = None
    prefix_user = user or url_user(",".join(servers))
    if settings.user is not None:
        if settings.password_file is not None:
            password = _secret_file(settings.password_file, where("password_file"), "password")
        elif env.get(ENV_PASSWORD):
            password = env[ENV_PASSWORD]
        else:
            raise ConfigError(
                f"{where('user')} names NATS user {settings.user!r} but no "
                f"password: set nats.password_file, {ENV_PASSWORD_FILE} or {ENV_PASSWORD}"
            )
    elif env.get(ENV_PASSWORD):
        raise ConfigError(
            f"{ENV_PASSWORD} is set but no NATS user is: set {ENV_USER} (or nats.user), "
            f"or unset {ENV_PASSWORD}"
        )
    if settings.token_file is not None:
        token = _secret_file(settings.token_file, where("token_file"), "token")
    if settings.nkey_seed_file is not None:
        prefix_user = _nkey_public_key(settings.nkey_seed_file, where("nkey_seed_file"))
        nkey_seed = str(settings.nkey_seed_file)
    if settings.creds_file is not None:
        prefix_user = _creds_user(settings.creds_file, where("creds_file"))
        creds = str(settings.creds_file)

    if user is None and token is None and nkey_seed is None and creds is None:
        # A password inside a URL is also handed over as the login of every server: the
        # servers a cluster announces (and nats-py reconnects to) carry no password, so
        # without it a reconnect to one of them is refused (Authorization Violation).
        login = url_login(servers)
        if login is not None:
            user, password = login
    return NatsConnection(
        servers=tuple(servers),
        settings=settings,
        inbox_prefix=settings.inbox_prefix or inbox_prefix(prefix_user),
        tls=tls,
        tls_hostname=settings.tls.server_name if settings.tls else None,
        tls_handshake_first=settings.tls.handshake_first if settings.tls else False,
        user=user,
        password=password,
        token=token,
        nkey_seed_file=nkey_seed,
        creds_file=creds,
    )


def _read(path: Path, where: str, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{where}: {path} does not exist: give the path of the {what}") from None
    except IsADirectoryError:
        raise ConfigError(f"{where}: {path} is a directory, not the {what} file") from None
    except OSError as exc:
        raise ConfigError(
            f"{where}: cannot read {path} ({exc.strerror or exc}): check its owner and mode"
        ) from None


def _secret_file(path: Path, where: str, what: str) -> str:
    data = _read(path, where, what)
    try:
        value = data.decode().strip()
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: {path} is not text: it should hold the {what} only") from None
    if not value:
        raise ConfigError(f"{where}: {path} is empty: it should hold the {what}")
    if "\n" in value:
        raise ConfigError(f"{where}: {path} holds more than one line: keep only the {what}")
    return value


def _tls_context(settings: NatsTLS, name_of: Callable[[str], str]) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.ca_file is not None:
        data = _read(settings.ca_file, name_of("ca_file"), "CA certificate (PEM)")
        if b"-----BEGIN CERTIFICATE-----" not in data:
            raise ConfigError(
                f"{name_of('ca_file')}: {settings.ca_file} holds no PEM certificate: give "
                "the CA that signed the NATS servers' certificates"
            )
        try:
            context.load_verify_locations(cadata=data.decode("ascii", "replace"))
        except ssl.SSLError as exc:
            raise ConfigError(
                f"{name_of('ca_file')}: {settings.ca_file} is not a readable PEM CA "
                f"certificate ({exc.reason or exc})"
            ) from None
    if settings.cert_file is not None and settings.key_file is not None:
        _read(settings.cert_file, name_of("cert_file"), "client certificate (PEM)")
        key = _read(settings.key_file, name_of("key_file"), "client key (PEM)")
        if b"ENCRYPTED" in key:
            raise ConfigError(
                f"{name_of('key_file')}: {settings.key_file} is encrypted: give the key "
                "without a passphrase (readable by this service only)"
            )

        def no_passphrase() -> str:
            raise ConfigError(f"{name_of('key_file')}: {settings.key_file} asks for a passphrase")

        try:
            context.load_cert_chain(settings.cert_file, settings.key_file, password=no_passphrase)
        except ssl.SSLError as exc:
            reason = exc.reason or str(exc)
            if "KEY_VALUES_MISMATCH" in reason.upper():
                raise ConfigError(
                    f"{name_of('key_file')}: {settings.key_file} is not the key of "
                    f"{settings.cert_file}: give the pair that belongs together"
                ) from None
            raise ConfigError(
                f"{name_of('cert_file')}/{name_of('key_file')}: cannot use "
                f"{settings.cert_file} with {settings.key_file} ({reason}): give a PEM "
                "certificate and its unencrypted PEM key"
            ) from None
    return context


def _nkey_public_key(path: Path, where: str) -> str:
    """The public key (``U...``) of the NKey seed in ``path``; checks the seed."""
    seed = _secret_file(path, where, "NKey seed (a line starting with SU)")
    try:
        pair = nkeys.from_seed(bytearray(seed.encode()))
        public = str(pair.public_key.decode())
        pair.wipe()
    except Exception:  # nkeys raises its own error classes and binascii errors
        raise ConfigError(
            f"{where}: {path} holds no valid NKey seed: it should hold one line starting "
            "with SU (nk -gen user, or nsc)"
        ) from None
    if not public.startswith("U"):
        raise ConfigError(f"{where}: {path} is not a user's NKey seed (it should start with SU)")
    return public


def _creds_user(path: Path, where: str) -> str:
    """The user a ``.creds`` file logs in as: the JWT's name (``nsc add user agent``
    names it ``agent``), else its public key. Checks the file's two parts."""
    text = _read(path, where, ".creds file").decode("utf-8", "replace")
    jwt = re.search(r"-----BEGIN NATS USER JWT-----\s*\n\s*(\S+)\s*\n", text)
    if jwt is None or "BEGIN USER NKEY SEED" not in text:
        raise ConfigError(
            f"{where}: {path} is not a .creds file: it should hold a NATS USER JWT and "
            "a USER NKEY SEED block (nsc generate creds)"
        )
    try:
        payload = jwt[1].split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError, binascii.Error):
        raise ConfigError(f"{where}: {path}: its user JWT is not readable") from None
    name = claims.get("name") if isinstance(claims, dict) else None
    subject = claims.get("sub") if isinstance(claims, dict) else None
    if isinstance(name, str) and name:
        return name
    if isinstance(subject, str) and subject:
        return subject
    raise ConfigError(f"{where}: {path}: its user JWT names no user (no name or sub claim)")
