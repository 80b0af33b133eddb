"""Refresh requirements/dev.lock, the exact (hashed) versions the README's install
command gives every machine, from the ranges in pyproject.toml.

    python requirements/lock.py            # same versions where the ranges still allow
    python requirements/lock.py --upgrade  # the newest release each range allows

It runs ``uv pip compile`` (uv is in the dev extra) for every platform, on Python 3.11
(the oldest fleetgate supports), and records a digest of pyproject.toml's dependency
lists in the lock, so ``tests/test_lock.py`` fails when the two disagree.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements" / "dev.lock"
PYPROJECT = ROOT / "pyproject.toml"
DIGEST_PREFIX = "# pyproject-dependencies-sha256: "
COMMAND = "python requirements/lock.py"


def dependency_digest(pyproject: Path = PYPROJECT) -> str:
    """A digest of what pyproject.toml asks for (python version, dependencies, extras)."""
    project = tomllib.loads(pyproject.read_text())["project"]
    declared = {
        "requires-python": project.get("requires-python"),
        "dependencies": sorted(project.get("dependencies", [])),
        "optional-dependencies": {
            name: sorted(reqs) for name, reqs in project.get("optional-dependencies", {}).items()
        },
    }
    return hashlib.sha256(json.dumps(declared, sort_keys=True).encode()).hexdigest()


def main(argv: list[str]) -> int:
    upgrade = "--upgrade" in argv
    cmd = [
        sys.executable, "-m", "uv", "pip", "compile", str(PYPROJECT.relative_to(ROOT)),
        "--extra", "dev", "--universal", "--python-version", "3.11", "--generate-hashes",
        "--no-header", "--quiet", "-o", str(LOCK.relative_to(ROOT)),
    ]  # fmt: skip
    if upgrade:
        cmd.append("--upgrade")
    done = subprocess.run(cmd, cwd=ROOT, check=False)
    if done.returncode != 0:
        return done.returncode
    body = LOCK.read_text()
    header = (
        "# The versions `pip install -r requirements/dev.lock` installs: fleetgate's\n"
        "# dependencies with the dev and sandbox extras, for every platform, Python 3.11+.\n"
        f"# Made by `{COMMAND}` from pyproject.toml; do not edit by hand.\n"
        f"{DIGEST_PREFIX}{dependency_digest()}\n"
    )
    LOCK.write_text(header + body)
    print(f"wrote {LOCK.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
