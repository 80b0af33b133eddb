"""The sandbox end to end: ``fleetgate sandbox up --detach`` once for the module, the
README's walkthrough run as written (commands and what they print come from README.md,
so the two cannot drift), redis-py and valkey-cli through ``fleetgate db connect`` as
alice, refusals where her role does not reach, her sessions in the audit, a second
``up`` refused, ``status``, and ``down`` leaving no process and no port behind."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats.aio.client
import pytest
import redis
import redis.cluster

from bus import Bus, RegistryError, subjects
from bus.access import Role, User
from bus.audit import SessionStart, publish_event
from sandbox.state import names_dir, nats_password_file
from tests.kits.proxy import valkey_cli

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parents[2]
MARKER = "<!-- sandbox-walkthrough"
HOME_SHOWN = "~/.fleetgate"
"""How the README writes the sandbox's home (the test's is a temporary directory)."""
DEV_DB = "orders-dev-memorydb-us-east-1-123456789012"
PROD_DB = "orders-prod-memorydb-us-east-1-123456789012"
STAGING_DB = "payments-staging-memorydb-eu-west-1-123456789012"
READY = re.compile(r"listening on 127\.0\.0\.1:(\d+) for (\S+) as (\S+); connect with: ")


# -- the README's walkthrough -------------------------------------------------------------


@dataclass
class Step:
    command: str
    expected: list[str]


def walkthrough(readme: Path = ROOT / "README.md") -> list[Step]:
    """The ``$ command`` lines of the fenced block after the marker comment, each with
    the lines it prints."""
    text = readme.read_text()
    start = text.index(MARKER)
    fence = text.index("```", start)
    body = text[text.index("\n", fence) + 1 : text.index("\n```", fence)]
    steps: list[Step] = []
    for line in body.splitlines():
        if line.startswith("$ "):
            steps.append(Step(line[2:], []))
        elif steps:
            steps[-1].expected.append(line)
    return steps


def _pattern(line: str) -> re.Pattern[str]:
    """``...`` is any text, a run of digits any run of digits, spaces any spaces."""
    out = ""
    for part in re.split(r"(\.\.\.|\d+|\s+)", line.strip()):
        if part == "...":
            out += ".*"
        elif part.isdigit():
            out += r"\d+"
        elif part.isspace():
            out += r"\s+"
        else:
            out += re.escape(part)
    return re.compile(out)


def check_output(step: Step, output: str) -> None:
    """Every expected line matches a line of the output (each a different one, in any
    order, since parts start in parallel); a line ``...`` allows more output lines."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    expected = [line for line in step.expected if line.strip()]
    more = "..." in [line.strip() for line in expected]
    left = list(lines)
    for line in expected:
        if line.strip() == "...":
            continue
        pattern = _pattern(line)
        found = next((x for x in left if pattern.fullmatch(x)), None)
        assert found is not None, f"$ {step.command}\nno line like {line!r} in:\n{output}"
        left.remove(found)
    assert more or not left, f"$ {step.command}\nunexpected lines {left} in:\n{output}"


def test_the_walkthrough_check_itself() -> None:
    """The rules the README's outputs are checked with: ``...`` is any text, digits any
    digits, spaces any spaces, lines in any order, a ``...`` line allows more."""
    step = Step("x", ["ready in 5.3s: 4 clusters", "  a  1.0s  vpc-...", ""])
    check_output(step, "a 12.5s vpc-0abc\nready in 14.0s:   4 clusters\n")
    with pytest.raises(AssertionError, match="no line like"):
        check_output(step, "ready in 5.3s: 4 databases\na 1.0s vpc-1\n")
    with pytest.raises(AssertionError, match="unexpected lines"):
        check_output(step, "ready in 5.3s: 4 clusters\na 1.0s vpc-1\nmore\n")
    check_output(
        Step("x", [*step.expected, "..."]), "more\nready in 1.0s: 4 clusters\na 1.0s vpc-\n"
    )
    steps = walkthrough()
    assert steps[0].command.startswith("fleetgate sandbox up")
    assert steps[-1].command.startswith("fleetgate sandbox down")
    assert any("db connect" in s.command and "--db-user app" in s.command for s in steps)


# -- the sandbox ----------------------------------------------------------------------------


@dataclass
class Sandbox:
    home: Path
    env: dict[str, str]

    @property
    def dir(self) -> Path:
        return self.home / "sandbox"

    def state(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.dir / "sandbox.json").read_text())
        return data

    def shell(self, script: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run ``script`` in bash as a person would type it; the sandbox's path shown as
        the README shows it."""
        done = subprocess.run(
            ["bash", "-c", script], env=self.env, capture_output=True, text=True,
            timeout=timeout, check=False, cwd=ROOT,
        )  # fmt: skip
        shown = str(self.home).rstrip("/")
        done.stdout = done.stdout.replace(shown, HOME_SHOWN)
        done.stderr = done.stderr.replace(shown, HOME_SHOWN)
        return done

    def fleetgate(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "fleetgate", *args], env=self.env, capture_output=True,
            text=True, timeout=timeout, check=False, cwd=ROOT,
        )  # fmt: skip


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FLEETGATE_"))}
    env["FLEETGATE_HOME"] = str(home)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(ROOT)  # the `fleetgate` script imports this checkout
    env["COLUMNS"] = "100"  # db ls fits the terminal: the README shows 100 columns
    return env


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    """The README's ``sandbox up`` (its first step), run once for the module."""
    home = tmp_path_factory.mktemp("home")
    box = Sandbox(home, _env(home))
    up = walkthrough()[0]
    assert up.command.startswith("fleetgate sandbox up"), up.command
    done = box.shell(up.command, timeout=120)
    try:
        assert done.returncode == 0, done.stdout + done.stderr
        check_output(up, done.stdout)
        yield box
    finally:
        if (box.dir / "sandbox.json").exists():
            box.fleetgate("sandbox", "down")


def test_readme_walkthrough(sandbox: Sandbox) -> None:
    """Every step between ``up`` and ``down`` in one shell (``eval`` carries over),
    each printing what the README shows."""
    steps = walkthrough()[1:-1]
    script = "\n".join(
        f"echo '@@step {i}'; {step.command} 2>&1; echo \"@@rc $?\"" for i, step in enumerate(steps)
    )
    done = sandbox.shell(script, timeout=120)
    parts = re.split(r"^@@step \d+\n", done.stdout, flags=re.M)[1:]
    assert len(parts) == len(steps), done.stdout + done.stderr
    for step, part in zip(steps, parts, strict=True):
        output, _, rc = part.rpartition("@@rc ")
        refused = "fleetgate: error:" in "\n".join(step.expected)
        assert (rc.strip() != "0") == refused, f"$ {step.command}\nexit {rc}: {output}"
        check_output(step, output)


# -- db connect as alice --------------------------------------------------------------------


@pytest.fixture(scope="module")
def alice(sandbox: Sandbox) -> Sandbox:
    """alice logged in (as the walkthrough does; again, so this runs on its own too)."""
    d = sandbox.dir
    done = sandbox.shell(
        f'fleetgate login --auth "$(sed -n "s/.*FLEETGATE_SANDBOX_AUTH=//p" {d}/env)" '
        f"--user alice --ca-file {d}/ca/ca.crt --password-stdin < {d}/alice.password"
    )
    assert done.returncode == 0, done.stderr
    return sandbox


class Tunnel:
    """``fleetgate db connect NAME --db-user USER --no-exec``; ``port`` once ready."""

    def __init__(self, box: Sandbox, name: str, db_user: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fleetgate", "db", "connect", name, "--db-user", db_user,
             "--no-exec"],
            env=box.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        found = READY.match(line)
        if found is None:
            err = self.close()
            raise AssertionError(f"db connect did not start: {line!r}; it said: {err}")
        self.port = int(found[1])

    def close(self) -> str:
        """Stop it; what it wrote to stderr."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            _, err = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return str(err or "")

    def __enter__(self) -> Tunnel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def test_redis_py_and_valkey_cli_through_db_connect(alice: Sandbox) -> None:
    """No password anywhere on alice's side: the agent logs ``app`` in with an IAM
    token that the stand-in checks."""
    with Tunnel(alice, DEV_DB, "app") as tunnel:
        for protocol in (2, 3):
            client = redis.Redis(port=tunnel.port, protocol=protocol, socket_timeout=10)
            with client:
                assert client.set(f"k{protocol}", "v")
                assert client.get(f"k{protocol}") == b"v"
                assert client.acl_whoami() in ("app", b"app")
                pipe = client.pipeline(transaction=False)
                for _ in range(50):
                    pipe.incr("counter")
                assert pipe.execute()[-1] >= 50
        cli = subprocess.run(
            [str(valkey_cli()), "-p", str(tunnel.port), "GET", "k2"],
            capture_output=True, text=True, timeout=20, check=False,
        )  # fmt: skip
        assert cli.stdout == "v\n", cli.stderr


def test_a_cluster_aware_client_through_db_connect(alice: Sandbox) -> None:
    """redis-py's RedisCluster asks CLUSTER SLOTS and dials what it names: the one-node
    view names the tunnel's own port (the route carries it), so it stays on the tunnel."""
    with Tunnel(alice, DEV_DB, "app") as tunnel:
        client = redis.cluster.RedisCluster(host="127.0.0.1", port=tunnel.port)
        try:
            nodes = client.get_nodes()
            assert [n.port for n in nodes] == [tunnel.port]
            keys = [f"rc:{i}" for i in range(40)]  # spread over every shard's slots
            for key in keys:
                assert client.set(key, key)
            assert client.mget_nonatomic(keys) == [k.encode() for k in keys]
        finally:
            client.close()


def test_refused_where_alices_role_does_not_reach(alice: Sandbox) -> None:
    prod = alice.fleetgate("db", "connect", PROD_DB, "--db-user", "app", "--no-exec")
    assert prod.returncode != 0
    assert f"no database '{PROD_DB}' that you may reach" in prod.stderr
    assert "Traceback" not in prod.stderr
    # a db user her role does not list: one line with the reason before anything
    # listens (the auth service checks it), no client started
    ops = alice.fleetgate("db", "connect", STAGING_DB, "--db-user", "ops")
    assert (ops.returncode, ops.stdout) == (1, "")
    assert ops.stderr == (
        f"fleetgate: error: none of your roles allows {STAGING_DB} as db user 'ops'\n"
    )


def test_sessions_in_the_audit(alice: Sandbox) -> None:
    with Tunnel(alice, STAGING_DB, "app") as tunnel:
        client = redis.Redis(port=tunnel.port, socket_timeout=10)
        with client:
            assert client.set("audited", "yes")
    found = alice.shell(
        'eval "$(fleetgate sandbox env)"; fleetgate audit search --user alice '
        f"--db {STAGING_DB} --since 1h --format json"
    )
    assert found.returncode == 0, found.stderr
    events = [json.loads(line) for line in found.stdout.splitlines()]
    starts = [e for e in events if e["type"] == "db.session.start"]
    assert any(e["success"] and e["db_user"] == "app" for e in starts), events
    assert any(e.get("command") == "SET" for e in events), events


# -- the bus and the secrets ----------------------------------------------------------------


def _nats_address(box: Sandbox) -> str:
    return next(p["address"] for p in box.state()["parts"] if p["name"] == "nats")


def _shell_nats_url(box: Sandbox) -> str:
    env = box.fleetgate("sandbox", "env")
    assert env.returncode == 0, env.stderr
    found = re.search(r"^export FLEETGATE_NATS_URL=(\S+)$", env.stdout, flags=re.M)
    assert found is not None, env.stdout
    return str(shlex.split(found[1])[0])


async def test_nats_refuses_anonymous_clients_and_the_shell_is_an_operator(
    sandbox: Sandbox,
) -> None:
    """The sandbox's NATS runs deploy/nats/nats-server.conf: no anonymous client, and
    the shell's user (operator) reads the registry but neither user records nor writes."""
    anonymous = nats.aio.client.Client()
    with pytest.raises(Exception) as refused:  # nats-py raises several kinds
        await anonymous.connect(_nats_address(sandbox), allow_reconnect=False)
    await anonymous.close()
    assert "authorization violation" in str(refused.value).lower()

    url = _shell_nats_url(sandbox)
    assert url.startswith("nats://operator:")
    bus = await Bus.connect(url, name="test", request_timeout=2.0)
    try:
        assert {r.name for r in await bus.list_resources(create=False)} >= {DEV_DB, PROD_DB}
        with pytest.raises(RegistryError):
            await bus.snapshot(subjects.USERS_BUCKET, User, create=False)
        with pytest.raises(RegistryError):
            await bus.put(subjects.ROLES_BUCKET, "dev-access", Role(name="dev-access"))
        with pytest.raises(Exception):  # noqa: B017 - refused publish: no ack ever comes
            await publish_event(bus, SessionStart(user="mallory"), ack_wait=1.0)
    finally:
        await bus.close()


def test_no_secret_outside_its_own_file_and_nothing_readable_by_others(
    sandbox: Sandbox,
) -> None:
    """alice's and the NATS users' passwords are only in their 0600 files: not in a log
    (sandbox.out printed the summary with alice's password), a config, the state or the
    env file; every file and directory of the sandbox is private to its owner."""
    d = sandbox.dir
    secret_files = {d / "alice.password", d / "ops.password", *(d / "nats-users").glob("*")}
    secrets = {f.name: f.read_text().strip() for f in secret_files if f.name != "ops.password"}
    assert {"alice.password", "operator.password", "agent.password", "admin.password"} <= set(
        secrets
    )
    assert all(len(value) >= 16 for value in secrets.values())
    leaks, public = [], []
    for root, dirs, files in os.walk(d):
        for name in dirs:
            mode = (Path(root) / name).lstat().st_mode
            if mode & 0o077:
                public.append(f"{root}/{name} {oct(mode)}")
        for name in files:
            path = Path(root) / name
            try:
                info = path.lstat()
                if not stat.S_ISREG(info.st_mode):
                    continue
                if info.st_mode & 0o077:
                    public.append(f"{path} {oct(info.st_mode)}")
                data = path.read_bytes() if path not in secret_files else b""
            except FileNotFoundError:  # a store's temporary file, gone meanwhile
                continue
            leaks += [f"{path}: {who}" for who, v in secrets.items() if v.encode() in data]
    assert d.stat().st_mode & 0o777 == 0o700
    assert not leaks
    assert not public


# -- second up, status, down ----------------------------------------------------------------


def test_second_up_is_refused(sandbox: Sandbox) -> None:
    again = sandbox.fleetgate("sandbox", "up", "--detach")
    assert again.returncode == 2
    assert f"a sandbox is already running in {sandbox.dir}" in again.stderr
    assert "fleetgate sandbox status" in again.stderr
    assert "fleetgate sandbox down" in again.stderr


def test_the_managed_user_is_set_up_by_the_agents(sandbox: Sandbox) -> None:
    """svc (tagged fleetgate.dev/managed in both regions) gets a secret and a password from
    the agents soon after start, and `fleetgate managed ls` shows it, never the password."""
    script = 'eval "$(fleetgate sandbox env)"; fleetgate managed ls --format json'
    deadline = time.monotonic() + 30
    while True:
        done = sandbox.shell(script)
        assert done.returncode == 0, done.stdout + done.stderr
        rows = json.loads(done.stdout)
        if len(rows) == 2 and all(r["rotated_ago"] is not None for r in rows):
            break
        assert time.monotonic() < deadline, rows
        time.sleep(0.5)
    assert {(r["user"], r["region"], r["state"]) for r in rows} == {
        ("svc", "us-east-1", "in use"),
        ("svc", "eu-west-1", "in use"),
    }
    assert {r["secret"] for r in rows} == {
        "fleetgate/memorydb/us-east-1/123456789012/user/svc",
        "fleetgate/memorydb/eu-west-1/123456789012/user/svc",
    }
    text = sandbox.shell('eval "$(fleetgate sandbox env)"; fleetgate managed ls').stdout
    assert text.splitlines()[0].split() == [
        "USER", "REGION", "ACCOUNT", "STATE", "ROTATED", "SECRET"
    ]  # fmt: skip
    assert "password" not in text


def test_each_agent_logs_in_to_nats_as_itself(sandbox: Sandbox) -> None:
    """The agents' environment names no NATS user: each got its own login at join
    (agent-<host_id>, kept 0600 in its data_dir) and is connected with it."""
    agents = sorted((sandbox.dir / "agents").iterdir())
    assert len(agents) == 2
    for data_dir in agents:
        host_id = (data_dir / "host_uuid").read_text().strip()
        login = data_dir / "nats-login.json"
        assert stat.S_IMODE(login.stat().st_mode) == 0o600
        assert json.loads(login.read_text())["user"] == f"agent-{host_id}"
        log = (sandbox.dir / "logs" / f"{data_dir.name}.log").read_text()
        assert "Authorization Violation" not in log


def test_a_chosen_port_in_use_is_named(tmp_path: Path) -> None:
    box = Sandbox(tmp_path, _env(tmp_path))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = box.fleetgate("sandbox", "up", "--nats-port", str(port))
    assert done.returncode == 2
    assert f"port {port} (given with --nats-port) is in use" in done.stderr
    assert not (tmp_path / "sandbox" / "sandbox.json").exists()


def test_up_detached_prints_its_summary_as_json(tmp_path: Path) -> None:
    """``sandbox up --detach --format json``: standard output is the summary as one JSON
    object, progress goes to the log; a second, small sandbox of its own."""
    box = Sandbox(tmp_path, _env(tmp_path))
    try:
        done = box.fleetgate("sandbox", "up", "--detach", "--clusters", "2", "--format", "json",
                             timeout=180)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        [line] = done.stdout.splitlines()  # no progress lines among the JSON
        doc = json.loads(line)
        assert doc["state"] == "ready" and doc["ready_seconds"] > 0
        assert doc["dir"] == str(box.dir) and Path(doc["env_file"]).is_file()
        names = {p["name"] for p in doc["parts"]}
        assert {"nats", "aws", "auth", "discovery", "agent-1", "agent-2"} <= names
        assert doc["auth"]["ca_fingerprint"].startswith("SHA256:")
        assert Path(doc["auth"]["ca_file"]).is_file()
        served = sorted(n for a in doc["agents"] for n in a["databases"])
        assert served == sorted(d["name"] for d in doc["databases"]) and len(served) == 2
        assert Path(doc["user"]["password_file"]).is_file()
        assert doc["login"].startswith("fleetgate login --auth 127.0.0.1:")
        # env and down take --format json too: the variables, then what was stopped
        text = box.fleetgate("sandbox", "env")
        as_json = box.fleetgate("sandbox", "env", "--format", "json")
        assert text.returncode == 0 == as_json.returncode, text.stderr + as_json.stderr
        exports = dict(
            shlex.split(line.removeprefix("export "))[0].split("=", 1)
            for line in text.stdout.splitlines()
            if line.startswith("export ")
        )
        variables = json.loads(as_json.stdout)
        assert variables == exports and variables["FLEETGATE_NATS_URL"].startswith("nats://")
        ports = len(box.state()["ports"])
        down = box.fleetgate("sandbox", "down", "--format", "json", timeout=120)
        assert down.returncode == 0, down.stdout + down.stderr
        assert json.loads(down.stdout) == {
            "dir": str(box.dir), "outcome": "stopped", "notes": [], "ports": ports,
        }  # fmt: skip
        again = box.fleetgate("sandbox", "down", "--format", "json")
        assert json.loads(again.stdout)["outcome"] == "not running"
    finally:
        if (box.dir / "sandbox.json").exists():
            down = box.fleetgate("sandbox", "down", timeout=120)
            assert down.returncode == 0, down.stdout + down.stderr


def test_status_shows_every_part_healthy(sandbox: Sandbox) -> None:
    done = sandbox.fleetgate("sandbox", "status", "--format", "json")
    assert done.returncode == 0, done.stdout + done.stderr
    doc = json.loads(done.stdout)
    assert doc["healthy"] is True
    names = {p["name"] for p in doc["parts"]}
    assert {"nats", "aws", "auth", "discovery", "agent-1", "agent-2"} <= names
    assert all(p["health"].startswith("ok") for p in doc["parts"]), doc["parts"]
    assert isinstance(doc["pid"], int) and all(isinstance(p["pid"], int) for p in doc["parts"])
    assert len(doc["databases"]) == 4
    assert all(d["agents"].endswith("healthy") for d in doc["databases"]), doc["databases"]


def test_every_process_serves_its_diagnostics(sandbox: Sandbox) -> None:
    """sandbox status names each process's diagnostics listener; each answers /readyz
    and /metrics (docs/operations.md)."""
    done = sandbox.fleetgate("sandbox", "status", "--format", "json")
    diag = {p["name"]: p["diag"] for p in json.loads(done.stdout)["parts"] if "diag" in p}
    assert set(diag) == {"auth", "discovery", "agent-1", "agent-2"}, diag
    prefixes = {"auth": "fleetgate_auth_", "discovery": "fleetgate_discovery_"}
    for name, url in diag.items():
        with urllib.request.urlopen(url + "readyz", timeout=10) as resp:
            assert resp.status == 200 and "ready" in resp.read().decode()
        with urllib.request.urlopen(url + "metrics", timeout=10) as resp:
            text = resp.read().decode()
        assert prefixes.get(name, "fleetgate_agent_") in text, name
        assert "fleetgate_event_loop_lag_seconds" in text
    table = sandbox.fleetgate("sandbox", "status").stdout
    assert "DIAGNOSTICS" in table and diag["agent-1"] + "metrics" in table


def test_ctrl_c_on_a_foreground_up_stops_everything(tmp_path: Path) -> None:
    box = Sandbox(tmp_path, _env(tmp_path))
    # A kept NATS password nats-server would misread unquoted (it stopped CI once).
    kept = nats_password_file(box.dir, "discovery")
    kept.parent.mkdir(parents=True, mode=0o700)
    kept.write_text("-wStartsWithADash\n")
    kept.chmod(0o600)
    with subprocess.Popen(  # leaving the block closes the pipes, whatever happened
        [sys.executable, "-m", "fleetgate", "sandbox", "up", "--clusters", "1"],
        env=box.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    ) as proc:  # fmt: skip
        try:
            assert proc.stdout is not None
            lines = []
            for line in proc.stdout:
                lines.append(line)
                if line.startswith("  fleetgate sandbox down"):
                    break
            assert any(line.startswith("ready in") for line in lines), "".join(lines)
            state = box.state()
            proc.send_signal(signal.SIGINT)
            rest, _ = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0
    assert rest.splitlines()[-1].endswith("sandbox      stopped"), rest
    assert box.state()["state"] == "stopped"
    pids = [int(p) for p in state["pids"]]
    assert not [pid for pid in pids if _not_zombie(pid) and names_dir(pid, box.dir)]


def test_down_leaves_nothing_behind(sandbox: Sandbox) -> None:
    """The README's last step; then no process of the sandbox, and every port free."""
    state = sandbox.state()
    pids = [int(p) for p in state["pids"]] + [int(state["pid"])]
    ports = [int(p) for p in state["ports"]]
    down = walkthrough()[-1]
    assert down.command.startswith("fleetgate sandbox down"), down.command
    done = sandbox.shell(down.command)
    assert done.returncode == 0, done.stdout + done.stderr
    check_output(down, done.stdout)
    # the README shows the count a run prints (check_output lets any digits match)
    assert f"no process left, {len(ports)} ports free" in done.stdout
    assert f"no process left, {len(ports)} ports free" in down.expected[0]
    assert "note:" not in done.stdout  # nothing had to be killed
    alive = [pid for pid in pids if _not_zombie(pid) and names_dir(pid, sandbox.dir)]
    assert not alive, alive
    for port in ports:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))  # raises when something still listens
    status = sandbox.fleetgate("sandbox", "status")
    assert status.returncode == 1 and "not running (last state: stopped)" in status.stdout


def _not_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
