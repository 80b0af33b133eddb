"""deploy/k8s, the kustomize base, built and checked offline: every object validates
against the Kubernetes API schemas (kubernetes-validate, strict), the pods are hardened
and probed, selectors and ports meet, Secrets are only referenced, the commands are real
fleetgate commands, and the configs in the ConfigMaps load with the real config loaders
on a copy of the pod's file system (every path in them on a mounted volume), so the
manifests cannot drift from the code. ``kubectl kustomize`` (or ``kustomize build``),
where installed, must build the same objects as the small builder here."""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import logging
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from bus import Bus
from bus.server import NatsServer
from dbservice.access.ca import CertificateAuthority
from dbservice.agent.app import CLOSE_TIMEOUT
from dbservice.agent.config import AgentConfig
from dbservice.agent.processes import STOP_TIMEOUT
from dbservice.auth.admin import sign_host
from dbservice.auth.service import AuthConfig, server_tls, split_listen
from dbservice.gateway.listener import AUDIT_FLUSH, STOP_GRACE
from discovery.settings import DiscoveryConfig
from fleetgate.addresses import split_host_port
from fleetgate.cli.main import build_parser
from fleetgate.config import load_model
from tests.kits.agent import running_agent
from tests.kits.connect import world
from tests.kits.listener import Fleet, static_db

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "deploy" / "k8s"
Obj = dict[str, Any]

KUBERNETES_VERSIONS = ("1.29.0", kubernetes_validate.utils.latest_version())
"""The oldest release the manifests promise to work on, and the newest schemas known."""
COMPONENTS = {"discovery": DiscoveryConfig, "agent": AgentConfig, "auth": AuthConfig}
SECRETS = {"fleetgate-nats", "fleetgate-agent-tls", "fleetgate-ca"}
"""The Secrets the base refers to (docs/deploy.md says how to make each)."""
HASH_SUFFIX = re.compile(r"-[a-z0-9]{10}$")


# -- the build ---------------------------------------------------------------------------


def build(base: Path = BASE) -> list[Obj]:
    """What ``kustomize build`` makes of this base, without the ConfigMaps' hash suffix:
    the resources (files, or directories with a kustomization of their own), and a
    ConfigMap per configMapGenerator entry (key: the file's name)."""
    kustomization = yaml.safe_load((base / "kustomization.yaml").read_text())
    known = {"apiVersion", "kind", "resources", "configMapGenerator"}
    assert set(kustomization) <= known, f"the builder here knows only {sorted(known)}"
    objects: list[Obj] = []
    for resource in kustomization["resources"]:
        if (base / resource).is_dir():
            objects += build(base / resource)
        else:
            objects += [d for d in yaml.safe_load_all((base / resource).read_text()) if d]
    for generator in kustomization.get("configMapGenerator", []):
        data = {}
        for entry in generator["files"]:
            key, _, path = entry.rpartition("=")
            data[key or Path(path).name] = (base / path).read_text()
        objects.append(
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": generator["name"]},
             "data": data}
        )  # fmt: skip
    return objects


@pytest.fixture(scope="module")
def objects() -> list[Obj]:
    return build()


def by_kind(objects: list[Obj], kind: str) -> dict[str, Obj]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def deployment(objects: list[Obj], component: str) -> Obj:
    return by_kind(objects, "Deployment")[f"fleetgate-{component}"]


def pod(objects: list[Obj], component: str) -> Obj:
    spec: Obj = deployment(objects, component)["spec"]["template"]["spec"]
    return spec


def main_container(objects: list[Obj], component: str) -> Obj:
    containers = pod(objects, component)["containers"]
    assert len(containers) == 1
    container: Obj = containers[0]
    return container


def all_containers(objects: list[Obj]) -> Iterator[tuple[str, Obj]]:
    for name, dep in by_kind(objects, "Deployment").items():
        spec = dep["spec"]["template"]["spec"]
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            yield f"{name}/{container['name']}", container


def _kustomize_command() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


def _unhashed(obj: Obj) -> Obj:
    """``obj`` with every generated ConfigMap name's hash suffix cut off."""
    text = yaml.safe_dump(obj)
    for name in ("discovery", "agent", "auth"):
        text = re.sub(
            rf"fleetgate-{name}-config-[a-z0-9]{{10}}\b", f"fleetgate-{name}-config", text
        )
    out: Obj = yaml.safe_load(text)
    return out


@pytest.mark.parametrize("part", ["", "discovery", "agent", "auth"])
def test_kustomize_builds_the_same(part: str) -> None:
    """The whole base, and each service's base alone (a region may run only agents)."""
    command = _kustomize_command()
    if command is None:
        pytest.skip("neither kustomize nor kubectl is installed (the build here is checked)")
    done = subprocess.run(
        [*command, str(BASE / part)], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    built = [d for d in yaml.safe_load_all(done.stdout) if d]
    names = [o["metadata"]["name"] for o in built if o["kind"] == "ConfigMap"]
    assert names and all(HASH_SUFFIX.search(n) for n in names), names  # rolled on change

    def key(o: Obj) -> tuple[str, str]:
        return o["kind"], o["metadata"]["name"]

    assert sorted(map(_unhashed, built), key=key) == sorted(build(BASE / part), key=key)
    if part:
        assert {o["metadata"]["name"] for o in built if o["kind"] == "Deployment"} == {
            f"fleetgate-{part}"
        }


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_validates_against_the_api_schemas(objects: list[Obj], version: str) -> None:
    kinds = sorted({o["kind"] for o in objects})
    assert kinds == [
        "ConfigMap", "Deployment", "PodDisruptionBudget", "Service", "ServiceAccount"
    ]  # fmt: skip
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(
                f"{obj['kind']}/{obj['metadata']['name']} ({version}): {exc.message} "
                f"at {'.'.join(map(str, exc.path))}"
            ) from None


def test_validation_catches_a_misspelt_field(objects: list[Obj]) -> None:
    """The check above has teeth: strict mode refuses an unknown field."""
    broken = copy.deepcopy(deployment(objects, "agent"))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


# -- pods ---------------------------------------------------------------------------------


def test_every_pod_is_hardened(objects: list[Obj]) -> None:
    for component in COMPONENTS:
        spec = pod(objects, component)
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] > 0
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec["automountServiceAccountToken"] is False
        assert spec["serviceAccountName"] == f"fleetgate-{component}"
    for where, container in all_containers(objects):
        context = container["securityContext"]
        assert context["runAsNonRoot"] is True, where
        assert context["allowPrivilegeEscalation"] is False, where
        assert context["readOnlyRootFilesystem"] is True, where
        assert context["capabilities"] == {"drop": ["ALL"]}, where
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert "privileged" not in context, where
        for kind in ("requests", "limits"):
            assert set(container["resources"][kind]) == {"cpu", "memory"}, where


def test_every_main_container_is_probed(objects: list[Obj]) -> None:
    for component in COMPONENTS:
        container = main_container(objects, component)
        assert container.get("readinessProbe") and container.get("livenessProbe"), component
        ports = {p["name"] for p in container.get("ports", [])}
        for probe in (container["readinessProbe"], container["livenessProbe"]):
            handler = probe.get("tcpSocket") or probe.get("httpGet")
            if handler is not None:
                assert handler["port"] in ports, component
    auth = main_container(objects, "auth")
    assert auth["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "https",
                                                  "scheme": "HTTPS"}  # fmt: skip


def test_service_accounts_carry_the_iam_roles(objects: list[Obj]) -> None:
    accounts = by_kind(objects, "ServiceAccount")
    assert set(accounts) == {f"fleetgate-{c}" for c in COMPONENTS}
    role = re.compile(r"^arn:aws:iam::\d{12}:role/[\w+=,.@-]+$")
    for component in ("discovery", "agent"):
        annotations = accounts[f"fleetgate-{component}"]["metadata"]["annotations"]
        assert role.match(annotations["eks.amazonaws.com/role-arn"]), component
    assert "annotations" not in accounts["fleetgate-auth"]["metadata"]  # calls no AWS API


def test_selectors_meet_their_pods(objects: list[Obj]) -> None:
    labels = {
        name: dep["spec"]["template"]["metadata"]["labels"]
        for name, dep in by_kind(objects, "Deployment").items()
    }
    for name, dep in by_kind(objects, "Deployment").items():
        assert dep["spec"]["selector"]["matchLabels"].items() <= labels[name].items()

    def selected(selector: dict[str, str]) -> list[str]:
        return [n for n, have in labels.items() if selector.items() <= have.items()]

    budgets = by_kind(objects, "PodDisruptionBudget")
    for component in COMPONENTS:
        name = f"fleetgate-{component}"
        assert selected(budgets[name]["spec"]["selector"]["matchLabels"]) == [name]
        assert deployment(objects, component)["spec"]["replicas"] >= 2  # the budget allows 1 down
        assert budgets[name]["spec"]["maxUnavailable"] == 1
    services = by_kind(objects, "Service")
    assert set(services) == {"fleetgate-agent", "fleetgate-auth"}
    for name, service in services.items():
        assert selected(service["spec"]["selector"]) == [name]
        component = name.removeprefix("fleetgate-")
        ports = {p["name"] for p in main_container(objects, component)["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, name


def test_secrets_are_referenced_never_inline(objects: list[Obj]) -> None:
    assert "Secret" not in {o["kind"] for o in objects}
    referred = set()
    for where, container in all_containers(objects):
        for env in container.get("env", []):
            assert "value" not in env, f"{where}: {env['name']} given inline"
            referred.add(env["valueFrom"]["secretKeyRef"]["name"])
    for component in COMPONENTS:
        for volume in pod(objects, component)["volumes"]:
            if "secret" in volume:
                referred.add(volume["secret"]["secretName"])
    assert referred == SECRETS
    for component in COMPONENTS:
        env = main_container(objects, component)["env"]
        assert env == [
            {"name": "FLEETGATE_NATS_URL",
             "valueFrom": {"secretKeyRef": {"name": "fleetgate-nats", "key": f"{component}-url"}}}
        ]  # fmt: skip
    text = yaml.safe_dump_all(objects)
    assert not re.search(r"://[^/\s@]*:[^/\s@]*@", text), "credentials in a URL"
    assert "BEGIN" not in text, "a key or certificate inline"


AGENT_STOP = CLOSE_TIMEOUT + STOP_GRACE + AUDIT_FLUSH + 2 * STOP_TIMEOUT + CLOSE_TIMEOUT
NATS_DRAIN = 30.0
AIOHTTP_SHUTDOWN = 60.0


def test_termination_grace_covers_the_graceful_stops(objects: list[Obj]) -> None:
    bounds = {
        "agent": AGENT_STOP,
        "discovery": NATS_DRAIN,
        "auth": AIOHTTP_SHUTDOWN + AUDIT_FLUSH + NATS_DRAIN,
    }
    for component, bound in bounds.items():
        assert pod(objects, component)["terminationGracePeriodSeconds"] > bound, component


# -- commands and configs -------------------------------------------------------------------


def test_commands_are_real_fleetgate_commands(objects: list[Obj]) -> None:
    for component in COMPONENTS:
        command = main_container(objects, component)["command"]
        assert command[0] == "fleetgate"
        args = build_parser().parse_args(command[1:])
        assert (args.command, args.action) == (component, "run")
        assert args.nats is None  # from FLEETGATE_NATS_URL (the Secret)


class PodFiles:
    """The file system a container sees, under ``root``: each of its volume mounts
    filled as Kubernetes fills it (a ConfigMap's keys, a Secret's items from ``secrets``,
    an empty emptyDir)."""

    def __init__(
        self,
        root: Path,
        objects: list[Obj],
        component: str,
        container: Obj,
        secrets: dict[str, dict[str, bytes]],
    ) -> None:
        self.root = root
        self.mounts: dict[str, Path] = {}
        volumes = {v["name"]: v for v in pod(objects, component)["volumes"]}
        maps = by_kind(objects, "ConfigMap")
        for mount in container["volumeMounts"]:
            volume = volumes[mount["name"]]
            where = root / mount["mountPath"].lstrip("/")
            where.mkdir(parents=True, exist_ok=True)
            self.mounts[mount["mountPath"]] = where
            if "configMap" in volume:
                for key, text in maps[volume["configMap"]["name"]]["data"].items():
                    (where / key).write_text(text)
            elif "secret" in volume:
                data = secrets[volume["secret"]["secretName"]]
                items = volume["secret"].get("items") or [{"key": k, "path": k} for k in data]
                for item in items:
                    file = where / item["path"]
                    file.write_bytes(data[item["key"]])
                    file.chmod(volume["secret"].get("defaultMode", 0o644))
            else:
                assert "emptyDir" in volume, mount

    def path(self, inside: str) -> Path:
        """Where a path of the container is here; it must be on a mounted volume."""
        for mount, where in self.mounts.items():
            if inside == mount or inside.startswith(mount + "/"):
                return where / inside[len(mount) :].lstrip("/")
        raise AssertionError(f"{inside}: on no volume of the pod")

    def rebase(self, value: Any) -> Any:
        """``value`` (a config) with every absolute path moved here."""
        if isinstance(value, dict):
            return {k: self.rebase(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.rebase(v) for v in value]
        if isinstance(value, str) and value.startswith("/"):
            return str(self.path(value))
        return value


def config_of(files: PodFiles, container: Obj) -> Obj:
    args = build_parser().parse_args(container["command"][1:])
    config = files.path(args.config)
    assert config.is_file(), f"{args.config}: not in the mounted ConfigMap"
    data: Obj = yaml.safe_load(config.read_text())
    return data


@pytest.fixture(scope="module")
def secrets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, bytes]]:
    """What an operator puts into the Secrets, made the documented way."""
    ca = CertificateAuthority.create()
    made = tmp_path_factory.mktemp("secrets")
    ca.save(made / "ca")
    sign_host(ca, ["agents.fleetgate.internal"], 3600.0, made / "agent")
    return {
        "fleetgate-agent-tls": {
            "tls.crt": (made / "agent" / "cert.pem").read_bytes(),
            "tls.key": (made / "agent" / "key.pem").read_bytes(),
        },
        "fleetgate-ca": {
            "ca.key": (made / "ca" / "ca.key").read_bytes(),
            "ca.crt": (made / "ca" / "ca.crt").read_bytes(),
        },
    }


def test_discovery_config_loads(objects: list[Obj], tmp_path: Path) -> None:
    container = main_container(objects, "discovery")
    files = PodFiles(tmp_path, objects, "discovery", container, {})
    config = load_model(DiscoveryConfig, files.rebase(config_of(files, container)), "discovery")
    assert config.discovery_service.aws
    assert config.nats.url is None  # FLEETGATE_NATS_URL


def test_agent_config_loads_on_the_pods_files(
    objects: list[Obj], tmp_path: Path, secrets: dict[str, dict[str, bytes]]
) -> None:
    container = main_container(objects, "agent")
    files = PodFiles(tmp_path, objects, "agent", container, secrets)
    raw = config_of(files, container)
    settings = load_model(AgentConfig, files.rebase(raw), "agent").db_service
    assert settings.listener is not None  # cert and key read from the mounted Secret
    # the data_dir is a writable volume of its own, not the read-only root
    data_dir = raw["db_service"]["data_dir"]
    assert data_dir in files.mounts
    volume = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}[data_dir]
    assert "emptyDir" in {v["name"]: v for v in pod(objects, "agent")["volumes"]}[volume]
    # clients reach the listen port through the Service at the advertised port
    _, listen_port = split_host_port(settings.listen_addr)
    (port,) = container["ports"]
    assert port["containerPort"] == listen_port
    (service_port,) = by_kind(objects, "Service")["fleetgate-agent"]["spec"]["ports"]
    assert split_host_port(settings.advertise())[1] == service_port["port"]


def test_auth_config_loads_and_its_ca_is_usable(
    objects: list[Obj], tmp_path: Path, secrets: dict[str, dict[str, bytes]]
) -> None:
    """The init container's copy of the CA passes the service's own check (key 0600,
    this user's) where the Secret's files (0440 for fsGroup) would not, and the service
    can issue itself its certificate in ca_dir."""
    spec = pod(objects, "auth")
    (init,) = spec["initContainers"]
    container = main_container(objects, "auth")
    init_files = PodFiles(tmp_path / "init", objects, "auth", init, secrets)
    files = PodFiles(tmp_path / "main", objects, "auth", container, secrets)
    # the two containers share the ca emptyDir
    shared = files.mounts["/var/lib/fleetgate/ca"]
    shutil.rmtree(init_files.mounts["/var/lib/fleetgate/ca"])
    init_files.mounts["/var/lib/fleetgate/ca"].symlink_to(shared)
    secret_copy = init_files.path("/etc/fleetgate/ca/ca.key")
    assert secret_copy.stat().st_mode & 0o777 == 0o440
    with pytest.raises(Exception, match="readable by others"):
        CertificateAuthority.load(secret_copy.parent)
    assert init["command"][:2] == ["python", "-c"]
    script, *paths = init["command"][2:]
    argv = [sys.executable, "-c", script, *(str(init_files.path(p)) for p in paths)]
    subprocess.run(argv, check=True, timeout=60)
    config = load_model(AuthConfig, files.rebase(config_of(files, container)), "auth")
    assert (Path(config.ca_dir) / "ca.key").stat().st_mode & 0o777 == 0o600
    ca = CertificateAuthority.load(Path(config.ca_dir))
    assert ca.pem == secrets["fleetgate-ca"]["ca.crt"].decode()
    assert server_tls(config, ca) is not None  # writes ca_dir/service/{cert,key}.pem
    (port,) = container["ports"]
    assert port["containerPort"] == split_listen(config.listen)[1]
    assert not [m for m in container["volumeMounts"] if m["name"] == "ca-secret"]


# -- the discovery probe ---------------------------------------------------------------------


def _probe_argv(objects: list[Obj]) -> list[str]:
    container = main_container(objects, "discovery")
    readiness = container["readinessProbe"]["exec"]["command"]
    assert container["livenessProbe"]["exec"]["command"] == readiness
    assert readiness[0] == "python"
    return [sys.executable, *readiness[1:]]


async def _probe(argv: list[str], url: str) -> tuple[int, str]:
    env = {**os.environ, "FLEETGATE_NATS_URL": url}
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_discovery_probe_sees_the_nats_connection(
    objects: list[Obj], nats_server: NatsServer, bus: Bus
) -> None:
    """The exec probe passes while the pod holds a connection to a NATS server of
    FLEETGATE_NATS_URL (a list of servers, a password in it) and fails, without
    printing the URL, when none is open."""
    argv = _probe_argv(objects)
    port = nats_server.port
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        idle = unused.getsockname()[1]
    secret = "s3cret-" + dt.datetime.now().strftime("%f")
    good = f"nats://discovery:{secret}@127.0.0.1:{idle},nats://discovery:{secret}@127.0.0.1:{port}"
    assert await _probe(argv, good) == (0, "")
    code, out = await _probe(argv, f"tls://discovery:{secret}@127.0.0.1:{idle}")
    assert code == 1 and f"no established connection to NATS (ports [{idle}])" in out
    assert secret not in out
    code, out = await _probe(argv, f"nats://discovery:{secret}@127.0.0.1:port")
    assert code == 1 and "cannot read a port" in out and secret not in out


def test_the_documented_overlay_builds(tmp_path: Path) -> None:
    """docs/deploy.md's overlay (namespace, image, IAM role, a replaced config) works on
    this base as written."""
    command = _kustomize_command()
    if command is None:
        pytest.skip("neither kustomize nor kubectl is installed")
    doc = (ROOT / "docs" / "deploy.md").read_text()
    (overlay,) = re.findall(r"```yaml\n# overlays/prod/kustomization.yaml\n(.*?)```", doc, re.S)
    shutil.copytree(BASE, tmp_path / "deploy" / "k8s")
    prod = tmp_path / "overlays" / "prod"
    prod.mkdir(parents=True)
    (prod / "kustomization.yaml").write_text(overlay)
    (prod / "agent.yaml").write_text((BASE / "agent" / "agent.yaml").read_text())
    done = subprocess.run(
        [*command, str(prod)], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    built = [d for d in yaml.safe_load_all(done.stdout) if d]
    assert {o["metadata"]["namespace"] for o in built} == {"fleetgate"}
    images = {c["image"] for _, c in all_containers(built)}
    assert images == {"REGISTRY/fleetgate:0.1.0"}
    agent = by_kind(built, "ServiceAccount")["fleetgate-agent"]["metadata"]["annotations"]
    assert agent["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::111122223333:")
    for obj in built:
        kubernetes_validate.validate(obj, KUBERNETES_VERSIONS[-1], strict=True)


async def _kubelet_https_get(port: int, path: str) -> tuple[int, bytes]:
    """What kubelet's HTTPS probe does: TLS without checking the certificate, no client
    certificate, a GET; the status and the body."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
    response = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def test_probes_pass_on_the_running_services(
    objects: list[Obj],
    bus: Bus,
    nats_server: NatsServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The auth service answers its probe's GET; the agent's listener takes the TCP
    probe's connections and logs nothing about them (they close before any TLS)."""
    http = main_container(objects, "auth")["readinessProbe"]["httpGet"]
    tcp = main_container(objects, "agent")["readinessProbe"]["tcpSocket"]
    assert tcp == {"port": "clients"}
    async with world(bus, tmp_path, nats_server.url) as w:
        assert await _kubelet_https_get(w.service.port, http["path"]) == (200, b"ok")
        fleet = Fleet(bus, w.ca, tmp_path, nats_server.url)
        config = fleet.agent("agent-a", [static_db("dev-cache", 1, env="dev")])
        async with running_agent(config, nats_server.url) as agent:
            assert agent.listener is not None
            caplog.clear()
            with caplog.at_level(logging.DEBUG, logger="dbservice.gateway"):
                for _ in range(3):
                    _, writer = await asyncio.open_connection("127.0.0.1", agent.listener.port)
                    writer.close()
                    await writer.wait_closed()
                await asyncio.sleep(0.5)
            said = [r for r in caplog.records if r.name.startswith("dbservice.gateway")]
            assert said and all(r.levelno == logging.DEBUG for r in said), [
                r.getMessage() for r in said
            ]
