"""Run a command as one of deploy/systemd's units runs it, for tests on a machine where
systemd does not run the units. Its system-call filter, set up as systemd sets it up:

* ``SystemCallFilter=``: the first line's groups and names are the allow list, lines
  starting with ``~`` take theirs out again (groups expanded by ``systemd-analyze
  syscall-filter``, so they are the installed systemd's own);
* every other system call fails with ``SystemCallErrorNumber=`` (EPERM);
* ``SystemCallArchitectures=native``: calls of another ABI are refused;
* ``RestrictAddressFamilies=``: ``socket()`` of any other family fails (systemd answers
  EAFNOSUPPORT, this filter EPERM);
* ``NoNewPrivileges=yes``.

It uses libseccomp (``libseccomp.so.2``, which systemd itself depends on) through ctypes.

With ``--uid``, and only inside a private mount namespace (``unshare --mount
--propagation private``), it also does what ``ProtectSystem=strict``, ``ProtectHome=yes``,
the unit's ``StateDirectory=`` and ``DynamicUser=yes`` do: every mount but the API file
systems (``/proc``, ``/sys``, ``/dev``) read-only except the ``--writable`` paths,
``/home``, ``/root`` and ``/run/user`` empty (in one that holds this Python, as a pyenv
one in /root, only its directory shows, read-only), and the command run as that user and
group with no supplementary groups (so with no capabilities).

    python -m tests.kits.unitrun UNIT_FILE [--uid N --writable PATH...] -- COMMAND [ARG...]
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
MS_BIND = 4096
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


API_FILE_SYSTEMS = ("/proc", "/sys", "/dev")
HIDDEN = ("/home", "/root", "/run/user")


def mount_points() -> list[str]:
    """This namespace's mount points (``/proc/self/mountinfo``, octal escapes undone)."""
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        assert "shared:" not in line, f"a shared mount here: {fields[4]} (use a private namespace)"
        points.append(fields[4].encode().decode("unicode_escape"))
    return points


def under(path: str, tops: tuple[str, ...]) -> bool:
    return any(path == top or path.startswith(top + "/") for top in tops)


def hide(path: str, interpreter: str) -> None:
    """An empty, read-only ``path``; if it holds ``interpreter`` (a pyenv Python in
    /root), only the interpreter's top directory shows in it, read-only."""
    keep = None
    if under(interpreter, (path,)):
        keep = os.path.join(path, os.path.relpath(interpreter, path).split(os.sep)[0])
    fd = os.open(keep, os.O_PATH | os.O_DIRECTORY) if keep else -1
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", path], check=True)
    if keep:
        os.mkdir(keep)
        # the kernel follows the descriptor to the original; mount(8) would resolve its
        # name, now the new, empty directory
        libc = ctypes.CDLL(None, use_errno=True)
        bound = libc.mount(f"/proc/self/fd/{fd}".encode(), keep.encode(), None, MS_BIND, None)
        assert bound == 0, f"bind {keep}: {os.strerror(ctypes.get_errno())}"
        os.close(fd)
        subprocess.run(["mount", "-o", "remount,bind,ro", keep], check=True)
    subprocess.run(["mount", "-o", "remount,bind,ro", path], check=True)


def protect_system(writable: list[str], uid: int) -> None:
    """ProtectSystem=strict, ProtectHome=yes, StateDirectory=, DynamicUser=yes (see the
    module's doc). Only in a namespace of its own: it refuses to run in the first one."""
    parent = f"/proc/{os.getppid()}/ns/mnt"
    if os.readlink("/proc/self/ns/mnt") == os.readlink(parent):
        raise SystemExit("--uid: run me in a private mount namespace (unshare --mount)")
    kept = tuple(os.path.realpath(p) for p in writable)
    for path in kept:  # each its own mount, which stays writable
        subprocess.run(["mount", "--bind", path, path], check=True)
    for point in sorted(set(mount_points())):
        if under(point, API_FILE_SYSTEMS) or point in kept:
            continue
        # remount,bind changes this mount's flags only, never the file system's
        subprocess.run(["mount", "-o", "remount,bind,ro", point], check=False,
                       stderr=subprocess.DEVNULL)  # fmt: skip
    interpreter = os.path.realpath(sys.executable)
    for path in HIDDEN:
        if os.path.isdir(path):
            hide(path, interpreter)
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    os.environ["HOME"] = "/"


def main(argv: list[str]) -> None:
    unit, *rest = argv
    sep = rest.index("--")
    options, command = rest[:sep], rest[sep + 1 :]
    assert command, __doc__
    if options:
        assert options[0] == "--uid" and options[2] == "--writable", __doc__
        protect_system(options[3:], int(options[1]))
    apply_filter(Path(unit))
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
