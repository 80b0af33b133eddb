"""Connecting to a real nats-server like a production client: TLS with a test CA,
mutual TLS the server demands (``verify: true``), a user whose password is in a file
or the environment, an NKey user, a JWT (.creds) user; each process's config file
loads and connects; no secret in a log line or an error message.

Every user of these servers may subscribe to its own inbox prefix only, as
deploy/nats/nats-server.conf has it: a JetStream call answers only when the prefix
follows the login.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bus import BUCKETS, Bus, BusUnavailable, subjects
from bus.schemas import DatabaseResource, DatabaseSpec, Metadata, TLSSettings
from bus.server import NatsServer, config_string
from bus.settings import NatsSettings, resolve_nats
from dbservice.agent.app import Agent
from dbservice.agent.config import AgentConfig
from dbservice.auth.service import AuthConfig
from discovery.settings import DiscoveryConfig
from fleetgate.cli import main
from fleetgate.config import load_model, read_yaml
from sandbox.aws import MotoServer
from sandbox.tlsca import IssuedCert, TestCA
from tests.kits import seed
from tests.kits.agent import FAST, wait_until
from tests.kits.natsauth import Operator, new_seed, public_key

SECRET = "pw-Zq81-never-shown"
ADMIN_SECRET = "adm-Kx55-never-shown"


def own_inbox(name: str) -> dict[str, Any]:
    """Publish anything; subscribe to the user's own replies only."""
    return {"publish": {"allow": [">"]}, "subscribe": {"allow": [f"_INBOX_{name}.>"]}}


def permissions_text(name: str) -> str:
    return (
        f'permissions: {{ publish: {{ allow: [">"] }}, '
        f'subscribe: {{ allow: ["_INBOX_{name}.>"] }} }}'
    )


def nats_client_cert(ca: TestCA, name: str) -> IssuedCert:
    """A plain TLS client certificate from the test CA. (Not the fleet CA's people
    certificates: their identity extension has an OID arc nats-server's x509 parser
    rejects, "malformed extension OID field".)"""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return IssuedCert(cert.public_bytes(serialization.Encoding.PEM), key_pem)


class Pki:
    """A test CA, the server's certificate, one client certificate."""

    def __init__(self, directory: Path) -> None:
        self.ca = TestCA.create()
        self.ca_file = self.ca.write(directory)
        self.server_cert, self.server_key = self.ca.issue_server_cert().write(directory, "server")
        self.cert_file, self.key_file = nats_client_cert(self.ca, "agent").write(
            directory, "client"
        )

    def client_tls(self, *, mutual: bool = True) -> dict[str, str]:
        tls = {"ca_file": str(self.ca_file)}
        if mutual:
            tls |= {"cert_file": str(self.cert_file), "key_file": str(self.key_file)}
        return tls


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NatsServer, Pki, Path]]:
    """nats-server demanding mutual TLS, with a password user ``agent``, an NKey user
    and an unrestricted ``admin``. Yields it, the PKI and the user's NKey seed file."""
    directory = tmp_path_factory.mktemp("nats-secure")
    pki = Pki(directory)
    seed = new_seed()
    seed_file = directory / "edge.nk"
    seed_file.write_bytes(seed + b"\n")
    seed_file.chmod(0o600)
    nkey = public_key(seed)
    conf = directory / "nats.conf"
    conf.write_text(
        "tls {\n"
        f'  cert_file: "{pki.server_cert}"\n'
        f'  key_file: "{pki.server_key}"\n'
        f'  ca_file: "{pki.ca_file}"\n'
        "  verify: true\n"
        "  timeout: 5\n"
        "}\n"
        "authorization { users = [\n"
        f"  {{ user: agent, password: $AGENT_PASSWORD, {permissions_text('agent')} }}\n"
        f"  {{ nkey: {nkey}, {permissions_text(nkey)} }}\n"
        "  { user: admin, password: $ADMIN_PASSWORD }\n"
        "]}\n"
    )
    env = {"AGENT_PASSWORD": config_string(SECRET), "ADMIN_PASSWORD": config_string(ADMIN_SECRET)}
    server = NatsServer(directory / "store", config_file=conf, env=env).start()
    try:
        yield server, pki, seed_file
    finally:
        server.stop()


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    path = tmp_path / "agent.password"
    path.write_text(SECRET + "\n")
    path.chmod(0o600)
    return path


async def use(bus: Bus) -> None:
    """A JetStream round trip: its answers come on the connection's inbox prefix."""
    await bus.provision(BUCKETS[subjects.DATABASES_BUCKET])
    await bus.list_resources()


def settings(**fields: Any) -> NatsSettings:
    return NatsSettings.model_validate(fields)


async def test_mutual_tls_and_a_password_from_a_file(
    secure: tuple[NatsServer, Pki, Path], password_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    server, pki, _ = secure
    configured = settings(
        servers=[server.url],
        tls=pki.client_tls(),
        user="agent",
        password_file=str(password_file),
    )
    conn = resolve_nats(None, configured, env={})
    assert conn.servers == (f"tls://127.0.0.1:{server.port}",)
    assert conn.inbox_prefix == "_INBOX_agent"
    async with await Bus.connect(conn, name="test") as bus:
        await use(bus)
    assert SECRET not in caplog.text


async def test_password_from_the_environment(
    secure: tuple[NatsServer, Pki, Path],
) -> None:
    server, pki, _ = secure
    env = {
        "FLEETGATE_NATS_SERVERS": server.url,
        "FLEETGATE_NATS_CA_FILE": str(pki.ca_file),
        "FLEETGATE_NATS_CERT_FILE": str(pki.cert_file),
        "FLEETGATE_NATS_KEY_FILE": str(pki.key_file),
        "FLEETGATE_NATS_USER": "agent",
        "FLEETGATE_NATS_PASSWORD": SECRET,
    }
    async with await Bus.connect(resolve_nats(None, None, env=env), name="test") as bus:
        await use(bus)


async def test_an_nkey_user(secure: tuple[NatsServer, Pki, Path]) -> None:
    server, pki, seed_file = secure
    conn = resolve_nats(
        None,
        settings(servers=[server.url], tls=pki.client_tls(), nkey_seed_file=str(seed_file)),
        env={},
    )
    assert conn.inbox_prefix.startswith("_INBOX_U")
    async with await Bus.connect(conn, name="test") as bus:
        await use(bus)


async def test_refusals_say_why_and_show_no_secret(
    secure: tuple[NatsServer, Pki, Path],
    password_file: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    server, pki, _ = secure
    wrong = tmp_path / "wrong.password"
    wrong.write_text("not-" + SECRET)
    cases = {
        # the server demands a client certificate
        "no client certificate": settings(
            servers=[server.url],
            tls=pki.client_tls(mutual=False),
            user="agent",
            password_file=str(password_file),
        ),
        # the server's certificate is not signed by a CA the system trusts
        "system roots": settings(
            servers=[server.url],
            tls={"cert_file": str(pki.cert_file), "key_file": str(pki.key_file)},
            user="agent",
            password_file=str(password_file),
        ),
        "wrong password": settings(
            servers=[server.url], tls=pki.client_tls(), user="agent", password_file=str(wrong)
        ),
        "password in the URL, no TLS": settings(
            url=f"nats://agent:{SECRET}@127.0.0.1:{server.port}"
        ),
    }
    for case, configured in cases.items():
        with pytest.raises(BusUnavailable) as caught:
            await Bus.connect(
                resolve_nats(None, configured, env={}), name="test", connect_timeout=2
            )
        message = str(caught.value)
        assert f"127.0.0.1:{server.port}" in message, case
        assert SECRET not in message and SECRET not in repr(caught.value.__cause__), case
    assert SECRET not in caplog.text and "not-" + SECRET not in caplog.text


async def test_tls_handshake_first(tmp_path: Path) -> None:
    """With handshake_first, TLS starts before the server's greeting; a server that
    does not speak TLS first is refused, so no login crosses in the clear."""
    pki = Pki(tmp_path)
    conf = tmp_path / "nats.conf"
    conf.write_text(
        f'tls {{ cert_file: "{pki.server_cert}", key_file: "{pki.server_key}", '
        "handshake_first: true }\n"
    )
    tls = {"ca_file": str(pki.ca_file), "handshake_first": True}
    with NatsServer(tmp_path / "store", config_file=conf) as server:
        conn = resolve_nats(server.url, settings(tls=tls), env={})
        async with await Bus.connect(conn, name="test") as bus:
            await use(bus)
    with NatsServer(tmp_path / "plain") as plain:
        token = tmp_path / "token"
        token.write_text(SECRET)
        conn = resolve_nats(plain.url, settings(tls=tls, token_file=str(token)), env={})
        with pytest.raises(BusUnavailable) as caught:
            await Bus.connect(conn, name="test", connect_timeout=2)
        assert SECRET not in str(caught.value)


async def test_a_jwt_user_from_a_creds_file(tmp_path: Path) -> None:
    operator = Operator()
    conf = tmp_path / "nats.conf"
    conf.write_text(operator.server_config(tmp_path))
    creds = operator.creds(
        tmp_path / "agent.creds", "agent", {"sub": {"allow": ["_INBOX_agent.>"]}}
    )
    other = operator.creds(
        tmp_path / "other.creds", "other", {"sub": {"allow": ["_INBOX_agent.>"]}}
    )
    with NatsServer(tmp_path / "store", config_file=conf) as server:
        conn = resolve_nats(None, settings(servers=[server.url], creds_file=str(creds)), env={})
        assert conn.inbox_prefix == "_INBOX_agent"
        async with await Bus.connect(conn, name="test") as bus:
            await use(bus)
        # A user allowed another inbox than its name's: JetStream stays silent, until
        # inbox_prefix says which one.
        conn = resolve_nats(None, settings(servers=[server.url], creds_file=str(other)), env={})
        async with await Bus.connect(conn, name="test", request_timeout=1) as bus:
            with pytest.raises(Exception):  # noqa: B017 - a timeout or a permission error
                await use(bus)
        env = {
            "FLEETGATE_NATS_CREDS_FILE": str(other),
            "FLEETGATE_NATS_INBOX_PREFIX": "_INBOX_agent",
        }
        async with await Bus.connect(resolve_nats(server.url, None, env=env), name="t") as bus:
            await use(bus)


# -- each process's config file -------------------------------------------------------------


def write_config(path: Path, body: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(body))
    return path


async def test_each_process_config_loads_and_connects(
    secure: tuple[NatsServer, Pki, Path],
    password_file: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    server, pki, seed_file = secure
    common = {"servers": [server.url], "tls": pki.client_tls()}
    discovery_file = write_config(
        tmp_path / "discovery.yaml",
        {
            "nats": {**common, "user": "agent", "password_file": str(password_file)},
            "discovery_service": {"aws": [{"types": ["memorydb"], "regions": ["us-east-1"]}]},
        },
    )
    auth_file = write_config(
        tmp_path / "auth.yaml",
        {"nats": {**common, "nkey_seed_file": str(seed_file)}, "ca_dir": str(tmp_path)},
    )
    discovery = load_model(DiscoveryConfig, read_yaml(discovery_file), str(discovery_file))
    auth = load_model(AuthConfig, read_yaml(auth_file), str(auth_file))
    for nats in (discovery.nats, auth.nats):
        async with await Bus.connect(resolve_nats(None, nats, env={}), name="test") as bus:
            await use(bus)

    # The agent itself, on its own config file: it provisions, reads the registry and
    # announces its database through the NKey login and mutual TLS.
    agent_file = write_config(
        tmp_path / "agent.yaml",
        {
            "nats": {**common, "nkey_seed_file": str(seed_file), "start_wait": "5s"},
            "db_service": {
                "hostname": "edge-1",
                "data_dir": str(tmp_path / "agent"),
                "databases": [{"name": "cache", "uri": "127.0.0.1:1"}],
                **FAST,
            },
        },
    )
    config = load_model(AgentConfig, read_yaml(agent_file), str(agent_file))
    agent = Agent(config, nats_url=resolve_nats(None, config.nats, env={}))
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    admin = f"nats://admin:{ADMIN_SECRET}@127.0.0.1:{server.port}"
    admin_conn = resolve_nats(None, settings(url=admin, tls=pki.client_tls()), env={})
    try:
        await wait_until(lambda: agent.synced.is_set() or task.done(), 20, "agent sync")
        assert not task.done()
        async with await Bus.connect(admin_conn, name="admin") as bus:
            await bus.put_resource(
                DatabaseResource(
                    metadata=Metadata(name="probe"),
                    spec=DatabaseSpec(uri="127.0.0.1:2", tls=TLSSettings(mode="disabled")),
                )
            )

            async def announced() -> bool:
                return any(hb.name == "cache" for hb in await bus.list_db_servers())

            await wait_until(announced, 20, "the agent's heartbeat")
    finally:
        stop.set()
        assert await asyncio.wait_for(task, 20) == 0
    assert SECRET not in caplog.text and ADMIN_SECRET not in caplog.text


async def test_no_password_in_the_clear_to_a_server_that_skips_tls(tmp_path: Path) -> None:
    """With a tls section, a server (or an impostor) that does not start TLS never gets
    the password or the token: the client refuses to send them, and says why."""
    pki = Pki(tmp_path)
    received = bytearray()

    async def impostor(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        info = {
            "server_id": "x",
            "version": "2.11.0",
            "max_payload": 1048576,
            "auth_required": True,
        }
        writer.write(f"INFO {json.dumps(info)}\r\n".encode())
        await writer.drain()
        with contextlib.suppress(Exception):
            while chunk := await asyncio.wait_for(reader.read(4096), 3):
                received.extend(chunk)
        writer.close()

    server = await asyncio.start_server(impostor, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    token = tmp_path / "token"
    token.write_text("tok-" + SECRET)
    try:
        for login in (
            {"user": "agent", "password_file": str(token)},
            {"token_file": str(token)},
        ):
            configured = settings(tls={"ca_file": str(pki.ca_file)}, **login)
            conn = resolve_nats(f"nats://127.0.0.1:{port}", configured, env={})
            with pytest.raises(BusUnavailable) as caught:
                await Bus.connect(conn, name="test", connect_timeout=2)
            assert SECRET not in bytes(received).decode(errors="replace")
            assert "did not start TLS" in str(caught.value)
    finally:
        server.close()
        await server.wait_closed()


def test_the_tls_check_works_on_uvloop(
    secure: tuple[NatsServer, Pki, Path], password_file: Path
) -> None:
    """The processes run on uvloop (fleetgate.aio.run), whose TLS is its own: the
    check that TLS started before the password is sent must see its handshakes too."""
    import uvloop

    server, pki, _ = secure
    configured = settings(
        servers=[server.url], tls=pki.client_tls(), user="agent", password_file=str(password_file)
    )

    async def main() -> None:
        async with await Bus.connect(resolve_nats(None, configured, env={}), name="t") as bus:
            await use(bus)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


def test_discovery_run_and_the_cli_over_tls(
    secure: tuple[NatsServer, Pki, Path],
    aws: MotoServer,
    password_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``fleetgate discovery run --once`` on a config file with mutual TLS and an NKey,
    then ``fleetgate db ls`` with the same kind of settings from FLEETGATE_NATS_*
    variables and the password from FLEETGATE_NATS_PASSWORD."""
    caplog.set_level(logging.DEBUG)
    server, pki, seed_file = secure
    seed.cluster("us-east-1", "orders", tags={"env": "prod"})
    config = write_config(
        tmp_path / "discovery.yaml",
        {
            "nats": {
                "servers": [server.url],
                "tls": pki.client_tls(),
                "nkey_seed_file": str(seed_file),
            },
            "discovery_service": {"aws": [{"types": ["memorydb"], "regions": ["us-east-1"]}]},
        },
    )
    assert main(["discovery", "run", "-c", str(config), "--once"]) == 0

    for name, value in {
        "FLEETGATE_NATS_SERVERS": server.url,
        "FLEETGATE_NATS_CA_FILE": str(pki.ca_file),
        "FLEETGATE_NATS_CERT_FILE": str(pki.cert_file),
        "FLEETGATE_NATS_KEY_FILE": str(pki.key_file),
        "FLEETGATE_NATS_USER": "agent",
        "FLEETGATE_NATS_PASSWORD": SECRET,
    }.items():
        monkeypatch.setenv(name, value)
    capsys.readouterr()
    assert main(["db", "ls", "--format", "json"]) == 0
    out, err = capsys.readouterr()
    # (the server is shared by this file's tests: others leave their records)
    assert "orders-memorydb-us-east-1-123456789012" in [d["name"] for d in json.loads(out)]

    monkeypatch.setenv("FLEETGATE_NATS_KEY_FILE", str(tmp_path / "missing.key"))
    assert main(["db", "ls"]) == 2
    err = capsys.readouterr().err
    assert "FLEETGATE_NATS_KEY_FILE" in err and "does not exist" in err
    assert "Traceback" not in err
    assert SECRET not in out + err + caplog.text
