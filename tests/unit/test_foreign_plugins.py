"""The suite runs the same whatever pytest plugins the machine has installed.

CI runs the README's test command in a shared Python that carries plugins we never
chose (pytest-benchmark among them, which refuses xdist with a warning that our
`filterwarnings = error` turns into an internal error before any test runs). So the
suite loads only the plugins pyproject.toml names. This test installs a plugin that
breaks every session it is loaded into and checks the suite does not load it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = """
def pytest_configure(config):
    raise RuntimeError("a plugin fleetgate never chose was loaded")
"""


def run_pytest(site: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    env.pop("PYTEST_ADDOPTS", None)
    env.pop("PYTEST_PLUGINS", None)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_plugin_installed_on_the_machine_is_not_loaded(tmp_path: Path) -> None:
    (tmp_path / "intruder_plugin.py").write_text(PLUGIN)
    info = tmp_path / "intruder-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: intruder\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[pytest11]\nintruder = intruder_plugin\n")
    target = "tests/unit/test_supervise.py"

    # Without the suite's options the plugin loads and breaks the run: the check has teeth.
    bare = run_pytest(tmp_path, "-o", "addopts=", "-q", target)
    assert bare.returncode != 0
    assert "a plugin fleetgate never chose was loaded" in bare.stdout + bare.stderr

    # With them (the README's command) it is never loaded, with workers or without.
    for workers in ("2", "0"):
        run = run_pytest(tmp_path, "-q", "-n", workers, target)
        assert run.returncode == 0, run.stdout + run.stderr
        assert "passed" in run.stdout
