"""Run a command under the system-call filter of one of deploy/systemd's units, set up as
systemd sets it up, for tests on a machine where systemd does not run the units:

* ``SystemCallFilter=``: the first line's groups and names are the allow list, lines
  starting with ``~`` take theirs out again (groups expanded by ``systemd-analyze
  syscall-filter``, so they are the installed systemd's own);
* every other system call fails with ``SystemCallErrorNumber=`` (EPERM);
* ``SystemCallArchitectures=native``: calls of another ABI are refused;
* ``RestrictAddressFamilies=``: ``socket()`` of any other family fails (systemd answers
  EAFNOSUPPORT, this filter EPERM);
* ``NoNewPrivileges=yes``.

It uses libseccomp (``libseccomp.so.2``, which systemd itself depends on) through ctypes.

    python -m tests.kits.syscalls UNIT_FILE -- COMMAND [ARG...]
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import socket
import subprocess
import sys
from pathlib import Path

SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_EQ = 4
FAMILIES = {"AF_INET": socket.AF_INET, "AF_INET6": socket.AF_INET6, "AF_UNIX": socket.AF_UNIX}


class ArgCmp(ctypes.Structure):
    """libseccomp's ``struct scmp_arg_cmp``."""

    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


def unit_settings(unit: Path) -> dict[str, list[str]]:
    """The ``[Service]`` section's ``Key=value`` lines (keys may repeat)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "Service":
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def syscall_groups() -> dict[str, list[str]]:
    """``@group`` -> its members (names and groups), as the installed systemd has them."""
    text = subprocess.run(
        ["systemd-analyze", "syscall-filter", "--no-pager"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    groups: dict[str, list[str]] = {}
    current: list[str] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("@") and not raw.startswith(" "):
            current = groups.setdefault(line, [])
        elif line and not line.startswith("#") and current is not None:
            current.append(line)
        elif not line:
            current = None
    return groups


def expand(items: list[str], groups: dict[str, list[str]]) -> set[str]:
    names: set[str] = set()
    for item in items:
        names |= expand(groups[item], groups) if item.startswith("@") else {item}
    return names


def allowed_syscalls(settings: dict[str, list[str]]) -> set[str]:
    """The allow list the unit's ``SystemCallFilter=`` lines make."""
    groups = syscall_groups()
    allowed: set[str] = set()
    for value in settings["SystemCallFilter"]:
        if value.startswith("~"):
            allowed -= expand(value[1:].split(), groups)
        else:
            allowed |= expand(value.split(), groups)
    return allowed


def apply_filter(unit: Path) -> None:
    """Load the unit's filter into this process (inherited by what it executes)."""
    settings = unit_settings(unit)
    assert settings["SystemCallArchitectures"] == ["native"]
    assert settings["NoNewPrivileges"] == ["yes"]
    refused = getattr(errno, settings["SystemCallErrorNumber"][0])
    families = [FAMILIES[f] for f in settings["RestrictAddressFamilies"][0].split()]
    lib = ctypes.CDLL(ctypes.util.find_library("seccomp") or "libseccomp.so.2", use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(ArgCmp)
    ]  # fmt: skip
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    ctx = lib.seccomp_init(0x00050000 | refused)  # SCMP_ACT_ERRNO(refused)
    assert ctx, "seccomp_init failed"
    for name in sorted(allowed_syscalls(settings) - {"socket"}):
        number = lib.seccomp_syscall_resolve_name(name.encode())
        if number < 0:  # not a system call of this architecture
            continue
        assert lib.seccomp_rule_add_array(ctx, SCMP_ACT_ALLOW, number, 0, None) == 0, name
    number = lib.seccomp_syscall_resolve_name(b"socket")
    for family in families:
        cmp = ArgCmp(0, SCMP_CMP_EQ, family, 0)
        assert lib.seccomp_rule_add_array(ctx, SCMP_ACT_ALLOW, number, 1, ctypes.byref(cmp)) == 0
    assert lib.seccomp_load(ctx) == 0, f"seccomp_load: {os.strerror(ctypes.get_errno())}"


def main(argv: list[str]) -> None:
    unit, sep, *command = argv
    assert sep == "--" and command, __doc__
    apply_filter(Path(unit))
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
