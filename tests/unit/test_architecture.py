"""The layers of docs/ARCHITECTURE.md hold: the import-linter contracts in pyproject.toml
(only bus/ speaks NATS, the engines import neither the agent nor the auth service, pure
cores import no I/O library, the client imports no server code, no cycles), and the bus
contract's records load without NATS."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_import_contracts_hold() -> None:
    run = "from importlinter.cli import lint_imports_command as c; c(['--no-cache'])"
    done = subprocess.run(
        [sys.executable, "-c", run],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_records_and_role_checks_load_without_nats_or_http() -> None:
    code = (
        "import sys; import bus, bus.access, bus.schemas, dbservice.access.rbac; "
        "from bus import DatabaseResource, Metadata; "
        "print(sorted(m for m in ('nats', 'aiohttp', 'aiobotocore') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]"
