"""requirements/dev.lock (what the README's install command installs) agrees with
pyproject.toml (the ranges fleetgate promises people who install it as a library)."""

from __future__ import annotations

import importlib.util
import re
import tomllib
from pathlib import Path
from types import ModuleType

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements" / "dev.lock"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def lock_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fleetgate_lock", ROOT / "requirements/lock.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pins() -> dict[str, Version]:
    found: dict[str, Version] = {}
    for line in LOCK.read_text().splitlines():
        match = PIN.match(line)
        if match:
            found[canonicalize_name(match[1])] = Version(match[2])
    return found


def declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in ("sandbox", "dev"):
        reqs += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return [r for r in reqs if canonicalize_name(r.name) != "fleetgate"]


def test_lock_was_made_from_this_pyproject() -> None:
    script = lock_script()
    recorded = [
        line.removeprefix(script.DIGEST_PREFIX)
        for line in LOCK.read_text().splitlines()
        if line.startswith(script.DIGEST_PREFIX)
    ]
    assert recorded == [script.dependency_digest()], (
        "pyproject.toml's dependencies changed since requirements/dev.lock was made: "
        f"run `{script.COMMAND}` and commit the lock"
    )


def test_every_declared_dependency_is_pinned_within_its_range() -> None:
    locked = pins()
    problems = []
    for req in declared():
        version = locked.get(canonicalize_name(req.name))
        if version is None:
            problems.append(f"{req.name} is not in the lock")
        elif not req.specifier.contains(version, prereleases=True):
            problems.append(f"{req.name}=={version} is outside {req}")
    assert problems == []


def test_every_pin_carries_hashes() -> None:
    text = LOCK.read_text()
    blocks = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 4)[-1])
    unhashed = [b.split()[0] for b in blocks if PIN.match(b) and "--hash=sha256:" not in b]
    assert unhashed == []
    assert len(pins()) > 50  # the whole environment, not just the direct dependencies


def test_the_digest_follows_every_dependency_list(tmp_path: Path) -> None:
    """The check above can fail: any change to a range or an extra changes the digest."""
    script = lock_script()
    original = (ROOT / "pyproject.toml").read_text()
    base = tmp_path / "pyproject.toml"
    base.write_text(original)
    digest = script.dependency_digest(base)
    for old, new in (
        ('"moto[server]>=5.2.5"', '"moto[server]>=5.2.6"'),
        ('"pytest>=8.4"', '"pytest>=9"'),
    ):
        assert old in original
        changed = tmp_path / "changed.toml"
        changed.write_text(original.replace(old, new))
        assert script.dependency_digest(changed) != digest
