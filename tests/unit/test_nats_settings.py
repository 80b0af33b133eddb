"""The NATS connection settings (bus/settings.py): layers (flag > environment > config
file), files read and checked, errors that name the setting and never a secret, and
the inbox prefix each kind of login gets."""

from __future__ import annotations

from pathlib import Path

import nkeys
import pytest
import yaml

from bus.settings import (
    DEFAULT_NATS_URL,
    NatsConnection,
    NatsSettings,
    resolve_nats,
)
from dbservice.agent.config import AgentConfig
from dbservice.auth.service import AuthConfig
from discovery.settings import DiscoveryConfig
from fleetgate.config import ConfigError, load_model
from sandbox.tlsca import TestCA
from tests.kits.natsauth import Operator, new_seed, public_key

SECRET = "s3cret-Pa55word"


def settings(**fields: object) -> NatsSettings:
    return NatsSettings.model_validate(fields)


def error_of(
    flag: str | None = None,
    configured: NatsSettings | None = None,
    env: dict[str, str] | None = None,
) -> str:
    with pytest.raises(ConfigError) as caught:
        resolve_nats(flag, configured, env=env or {})
    return str(caught.value)


def invalid(**fields: object) -> str:
    """The message a config file with this ``nats:`` section gets."""
    with pytest.raises(ConfigError) as caught:
        load_model(
            DiscoveryConfig,
            {
                "nats": fields,
                "discovery_service": {"aws": [{"types": ["memorydb"], "regions": ["us-east-1"]}]},
            },
            "discovery.yaml",
        )
    return str(caught.value)


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    path = tmp_path / "nats-password"
    path.write_text(SECRET + "\n")
    return path


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA.create()


# -- servers and their layers -----------------------------------------------------------


def test_default_is_the_local_server() -> None:
    conn = resolve_nats(None, None, env={})
    assert conn.servers == (DEFAULT_NATS_URL,)
    assert conn.inbox_prefix == "_INBOX"
    assert conn.tls is None


def test_servers_list_and_the_older_url_form() -> None:
    listed = resolve_nats(None, settings(servers=["nats://a:4222", "nats://b:4222"]), env={})
    assert listed.servers == ("nats://a:4222", "nats://b:4222")
    old = resolve_nats(None, settings(url="nats://a:4222, nats://b:4222"), env={})
    assert old.servers == listed.servers
    bare = resolve_nats(None, settings(servers=["nats-1:4222"], tls={}), env={})
    assert bare.servers == ("tls://nats-1:4222",)
    assert "set servers or url, not both" in invalid(servers=["nats://a:1"], url="nats://b:1")


def test_flag_beats_environment_beats_config_file() -> None:
    configured = settings(servers=["nats://file:4222"])
    env = {"FLEETGATE_NATS_SERVERS": "nats://env-1:4222,nats://env-2:4222"}
    assert resolve_nats(None, configured, env={}).servers == ("nats://file:4222",)
    assert resolve_nats(None, configured, env=env).servers == (
        "nats://env-1:4222",
        "nats://env-2:4222",
    )
    assert resolve_nats(None, configured, env={"FLEETGATE_NATS_URL": "nats://old:1"}).servers == (
        "nats://old:1",
    )
    assert resolve_nats("nats://flag:4222", configured, env=env).servers == ("nats://flag:4222",)
    both = {"FLEETGATE_NATS_SERVERS": "nats://a:1", "FLEETGATE_NATS_URL": "nats://b:1"}
    assert "set only FLEETGATE_NATS_SERVERS" in error_of(None, configured, both)


def test_a_server_that_is_no_nats_url_is_named() -> None:
    assert "use nats:// or tls://" in invalid(servers=["http://a:4222"])
    message = error_of("redis://agent:" + SECRET + "@h:1")
    assert "--nats" in message and "use nats:// or tls://" in message
    assert SECRET not in message


# -- TLS --------------------------------------------------------------------------------


def test_tls_section_builds_a_context_and_forces_tls(tmp_path: Path, ca: TestCA) -> None:
    ca_file = ca.write(tmp_path)
    cert_file, key_file = ca.issue_client_cert("agent").write(tmp_path, "client")
    tls = {"ca_file": str(ca_file), "cert_file": str(cert_file), "key_file": str(key_file)}
    conn = resolve_nats(
        None, settings(servers=["nats://n1:4222", "tls://n2:4222"], tls=tls), env={}
    )
    assert conn.servers == ("tls://n1:4222", "tls://n2:4222")
    assert conn.tls is not None
    assert conn.tls.verify_mode.name == "CERT_REQUIRED" and conn.tls.check_hostname


def test_tls_files_come_from_the_environment(tmp_path: Path, ca: TestCA) -> None:
    ca_file = ca.write(tmp_path)
    conn = resolve_nats(None, None, env={"FLEETGATE_NATS_CA_FILE": str(ca_file)})
    assert conn.tls is not None and conn.servers == ("tls://127.0.0.1:4222",)
    message = error_of(env={"FLEETGATE_NATS_CA_FILE": str(tmp_path / "missing.crt")})
    assert "FLEETGATE_NATS_CA_FILE" in message and "missing.crt does not exist" in message


def test_tls_errors_name_the_field_and_the_fix(tmp_path: Path, ca: TestCA) -> None:
    ca_file = ca.write(tmp_path)
    cert_file, key_file = ca.issue_client_cert("agent").write(tmp_path, "client")
    _, other_key = ca.issue_client_cert("other").write(tmp_path, "other")
    not_pem = tmp_path / "notpem.crt"
    not_pem.write_text("hello\n")

    assert "cert_file is set without key_file" in invalid(tls={"cert_file": str(cert_file)})
    assert "key_file is set without cert_file" in invalid(tls={"key_file": str(key_file)})
    message = error_of(configured=settings(tls={"ca_file": str(tmp_path / "nope.crt")}))
    assert "nats.tls.ca_file" in message and "does not exist" in message
    message = error_of(configured=settings(tls={"ca_file": str(not_pem)}))
    assert "nats.tls.ca_file" in message and "holds no PEM certificate" in message
    message = error_of(configured=settings(tls={"ca_file": str(tmp_path)}))
    assert "is a directory" in message
    mismatched = {"ca_file": str(ca_file), "cert_file": str(cert_file), "key_file": str(other_key)}
    message = error_of(configured=settings(tls=mismatched))
    assert "nats.tls.key_file" in message and "is not the key of" in message
    garbage = tmp_path / "garbage.key"
    garbage.write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    message = error_of(
        configured=settings(tls={"cert_file": str(cert_file), "key_file": str(garbage)})
    )
    assert "nats.tls.cert_file/nats.tls.key_file: cannot use" in message


def test_an_encrypted_key_is_refused_without_a_prompt(tmp_path: Path, ca: TestCA) -> None:
    from cryptography.hazmat.primitives import serialization

    issued = ca.issue_client_cert("agent")
    cert_file, key_file = issued.write(tmp_path, "client")
    key = serialization.load_pem_private_key(issued.key_pem, None)
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    message = error_of(
        configured=settings(tls={"cert_file": str(cert_file), "key_file": str(key_file)})
    )
    assert "is encrypted" in message and "nats.tls.key_file" in message


# -- credentials ------------------------------------------------------------------------


def test_user_and_password_file(password_file: Path) -> None:
    conn = resolve_nats(None, settings(user="agent", password_file=str(password_file)), env={})
    assert (conn.user, conn.password) == ("agent", SECRET)
    assert conn.inbox_prefix == "_INBOX_agent"
    assert SECRET not in repr(conn)


def test_password_from_the_environment() -> None:
    conn = resolve_nats(None, settings(user="agent"), env={"FLEETGATE_NATS_PASSWORD": SECRET})
    assert conn.password == SECRET
    message = error_of(configured=settings(user="agent"))
    assert "no password" in message and "FLEETGATE_NATS_PASSWORD" in message
    message = error_of(env={"FLEETGATE_NATS_PASSWORD": SECRET})
    assert "no NATS user" in message and SECRET not in message


def test_environment_credentials_replace_the_config_files(
    password_file: Path, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("tok-" + SECRET)
    configured = settings(user="agent", password_file=str(password_file))
    conn = resolve_nats(None, configured, env={"FLEETGATE_NATS_TOKEN_FILE": str(token_file)})
    assert (conn.user, conn.password, conn.token) == (None, None, "tok-" + SECRET)
    assert conn.inbox_prefix == "_INBOX"
    env = {"FLEETGATE_NATS_USER": "other", "FLEETGATE_NATS_PASSWORD_FILE": str(password_file)}
    conn = resolve_nats(None, configured, env=env)
    assert (conn.user, conn.inbox_prefix) == ("other", "_INBOX_other")


def test_two_kinds_of_credentials_are_refused(password_file: Path, tmp_path: Path) -> None:
    message = invalid(user="agent", password_file=str(password_file), creds_file="x.creds")
    assert "user and creds_file are set: choose one kind" in message
    message = invalid(url=f"nats://agent:{SECRET}@h:4222", token_file="t")
    assert "a password in the server URL" in message and SECRET not in message
    env = {"FLEETGATE_NATS_NKEY_SEED_FILE": "a", "FLEETGATE_NATS_CREDS_FILE": "b"}
    message = error_of(env=env)
    assert "FLEETGATE_NATS_CREDS_FILE" in message and "choose one kind" in message
    assert "password_file is set without user" in invalid(password_file=str(password_file))


def test_secret_files_are_checked(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    two = tmp_path / "two"
    two.write_text(f"{SECRET}\n{SECRET}\n")
    for path, expected in (
        (tmp_path / "missing", "does not exist"),
        (empty, "is empty"),
        (two, "more than one line"),
    ):
        message = error_of(configured=settings(user="agent", password_file=str(path)))
        assert "nats.password_file" in message and expected in message
        assert SECRET not in message
    unreadable = tmp_path / "unreadable"
    unreadable.write_text(SECRET)
    unreadable.chmod(0)
    try:
        if not unreadable.stat().st_mode & 0o444 and _cannot_read(unreadable):
            message = error_of(configured=settings(token_file=str(unreadable)))
            assert "cannot read" in message and "check its owner and mode" in message
    finally:
        unreadable.chmod(0o600)


def _cannot_read(path: Path) -> bool:
    try:
        path.read_bytes()
    except PermissionError:
        return True
    return False  # root reads it anyway


def test_nkey_seed(tmp_path: Path) -> None:
    seed = new_seed()
    path = tmp_path / "agent.nk"
    path.write_bytes(seed + b"\n")
    conn = resolve_nats(None, settings(nkey_seed_file=str(path)), env={})
    assert conn.nkey_seed_file == str(path)
    assert conn.inbox_prefix == "_INBOX_" + public_key(seed)
    assert seed.decode() not in repr(conn)
    path.write_text("SUNOTASEED\n")
    message = error_of(configured=settings(nkey_seed_file=str(path)))
    assert "nats.nkey_seed_file" in message and "holds no valid NKey seed" in message
    path.write_text(new_seed(nkeys.PREFIX_BYTE_OPERATOR).decode())
    message = error_of(configured=settings(nkey_seed_file=str(path)))
    assert "not a user's NKey seed" in message


def test_creds_file_and_its_user_name(tmp_path: Path) -> None:
    creds = Operator().creds(tmp_path / "agent.creds", "agent")
    conn = resolve_nats(None, settings(creds_file=str(creds)), env={})
    assert conn.creds_file == str(creds) and conn.inbox_prefix == "_INBOX_agent"
    explicit = settings(creds_file=str(creds), inbox_prefix="_INBOX_edge")
    assert resolve_nats(None, explicit, env={}).inbox_prefix == "_INBOX_edge"
    bad = tmp_path / "bad.creds"
    bad.write_text("not creds\n")
    message = error_of(env={"FLEETGATE_NATS_CREDS_FILE": str(bad)})
    assert "FLEETGATE_NATS_CREDS_FILE" in message and "is not a .creds file" in message


def test_inbox_prefix_is_checked() -> None:
    assert "is not a subject prefix" in invalid(inbox_prefix="_INBOX.>")
    assert "is not a subject prefix" in invalid(inbox_prefix="my inbox")
    env = {"FLEETGATE_NATS_INBOX_PREFIX": "_INBOX_x"}
    assert resolve_nats(None, None, env=env).inbox_prefix == "_INBOX_x"


def test_url_with_a_password_keeps_working_and_is_never_shown() -> None:
    conn = NatsConnection.from_url(f"nats://agent:{SECRET}@h1:4222,nats://h2:4222")
    assert conn.inbox_prefix == "_INBOX_agent"
    assert conn.shown == "nats://agent:***@h1:4222,nats://h2:4222"
    assert SECRET not in repr(conn) and SECRET not in repr(conn.settings)


# -- every process's config file ----------------------------------------------------------


NATS_SECTION = {
    "servers": ["tls://nats-1:4222", "tls://nats-2:4222"],
    "tls": {"ca_file": "/etc/fleetgate/nats-ca.crt"},
    "creds_file": "/etc/fleetgate/agent.creds",
}


def test_every_config_file_takes_the_same_section() -> None:
    agent = load_model(
        AgentConfig,
        {
            "nats": {**NATS_SECTION, "start_wait": "1m"},
            "db_service": {"databases": [{"name": "cache", "uri": "127.0.0.1:6379"}]},
        },
        "agent.yaml",
    )
    assert agent.nats.servers == NATS_SECTION["servers"] and agent.nats.start_wait == 60
    discovery = load_model(
        DiscoveryConfig,
        {
            "nats": NATS_SECTION,
            "discovery_service": {"aws": [{"types": ["memorydb"], "regions": ["us-east-1"]}]},
        },
        "discovery.yaml",
    )
    auth = load_model(AuthConfig, {"nats": NATS_SECTION, "ca_dir": "/x"}, "auth.yaml")
    assert agent.nats.creds_file == discovery.nats.creds_file == auth.nats.creds_file
    message = invalid(**NATS_SECTION, password="x")
    assert "nats.password: unknown field" in message


def test_the_deploy_examples_load() -> None:
    root = Path(__file__).parents[2] / "deploy"
    for name, model in (
        ("agent.yaml", AgentConfig),
        ("discovery.yaml", DiscoveryConfig),
        ("auth.yaml", AuthConfig),
    ):
        section = yaml.safe_load((root / name).read_text())["nats"]
        nats = model.model_fields["nats"].annotation
        assert isinstance(nats, type) and issubclass(nats, NatsSettings)
        loaded = load_model(nats, section, f"{name}: nats")
        assert loaded.creds_file is not None and loaded.tls is not None
        assert all(server.startswith("tls://") for server in loaded.servers)


def test_sandbox_children_get_only_their_own_nats_login(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from sandbox.children import child_env

    monkeypatch.setenv("FLEETGATE_NATS_CREDS_FILE", str(tmp_path / "mine.creds"))
    monkeypatch.setenv("FLEETGATE_NATS_SERVERS", "tls://prod:4222")
    env = child_env({}, f"nats://agent:{SECRET}@127.0.0.1:4222", tmp_path)
    assert [name for name in env if name.startswith("FLEETGATE_NATS_")] == ["FLEETGATE_NATS_URL"]
    conn = resolve_nats(None, None, env=env)
    assert conn.servers == (f"nats://agent:{SECRET}@127.0.0.1:4222",)
