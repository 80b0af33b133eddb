"""The native scanner (dbservice/engine/proxy/_scan.c) against the pure-Python readers,
byte for byte.

The scanner only ever reads whole multibulk commands written the canonical way and
answers None for anything else; both engines' readers try it first and read the rest
in Python. So a reader with it and a reader without it must give exactly the same
result on any input cut at any points: the same commands with the same arguments and
bytes, the same hook calls, the same refusals and the same protocol errors. The
generator is the one the differential fuzz against valkey-server uses
(tests/kits/parserfuzz.py), whose inputs the server itself judged
(tests/integration/test_parser_framing.py runs them with the scanner on).
"""

from __future__ import annotations

import random
import shutil
import sysconfig
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from dbservice.engine.cluster.resp import CommandReader
from dbservice.engine.proxy import PassThroughHooks, ProtocolError, ProxyLimits
from dbservice.engine.proxy.commands import CommandParser
from dbservice.engine.proxy.framing import NATIVE_SCAN
from dbservice.engine.proxy.pending import Item, Local
from tests.kits.parserfuzz import case, pieces

if NATIVE_SCAN is None:
    pytestmark = pytest.mark.skip(reason="the native scanner is not built or is turned off")
else:
    scan = NATIVE_SCAN

LIMITS = (1 << 31) - 1, 512 << 20


def _can_build() -> bool:
    include = sysconfig.get_path("include")
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    return Path(include, "Python.h").exists() and shutil.which(compiler) is not None


@pytest.mark.skipif(not _can_build(), reason="no C compiler or Python headers here")
def test_the_native_scanner_is_built_where_it_can_be() -> None:
    """`pip install` builds it as an optional extension: a failed build would pass
    silently (and every command would be read in Python) but for this test."""
    assert NATIVE_SCAN is not None, (
        "dbservice/engine/proxy/_scan.c was not built: reinstall with "
        "`python -m pip install --no-deps -e .` and read the compiler's output"
    )


def _cmd(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


def test_a_whole_canonical_command_is_read_with_its_arguments() -> None:
    data = b"junk" + _cmd(b"SET", b"k", b"a\r\nb") + _cmd(b"GET", b"") + b"*1\r\n"
    first = scan.command(data, 4, *LIMITS)
    assert first == ([b"SET", b"k", b"a\r\nb"], 4 + len(_cmd(b"SET", b"k", b"a\r\nb")))
    second = scan.command(data, first[1], *LIMITS)
    assert second == ([b"GET", b""], len(data) - 4)
    assert scan.command(data, len(data) - 4, *LIMITS) is None  # not all here
    assert scan.command(data, len(data), *LIMITS) is None
    out: list[tuple[list[bytes], bytes]] = []
    assert scan.commands(data, 4, out, *LIMITS) == len(data) - 4
    assert out == [
        ([b"SET", b"k", b"a\r\nb"], _cmd(b"SET", b"k", b"a\r\nb")),
        ([b"GET", b""], _cmd(b"GET", b"")),
    ]


@pytest.mark.parametrize(
    "data",
    [
        b"*+1\r\n$4\r\nPING\r\n",  # a sign
        b"*01\r\n$4\r\nPING\r\n",  # a leading zero
        b"* 1\r\n$4\r\nPING\r\n",
        b"*1 \r\n$4\r\nPING\r\n",
        b"*0\r\n",  # skipped by the server: the Python reader's
        b"*-1\r\n",
        b"*\r\n",
        b"*1\r\r\n$4\r\nPING\r\n",
        b"*1\n$4\r\nPING\r\n",
        b"*1\r\n$04\r\nPING\r\n",
        b"*1\r\n$+4\r\nPING\r\n",
        b"*1\r\n$-1\r\n",
        b"*1\r\n$4\r\nPINGX\r\n",  # the payload not followed by CR LF
        b"*1\r\n$4\r\nPING\n\r",
        b"*1\r\n$4\r\nPING\r\r",
        b"*1\r\n:4\r\nPING\r\n",
        b"*1\r\n$4\rPING\r\n",
        b"PING\r\n",  # inline
        b"*1\r\n$9999999999999999999\r\nx\r\n",  # 19 digits
        b"*99999999999999999999\r\n",
        b"*2\r\n$4\r\nPING\r\n",  # one argument missing
    ],
)
def test_anything_else_is_left_to_the_python_reader(data: bytes) -> None:
    assert scan.command(data, 0, *LIMITS) is None
    out: list[tuple[list[bytes], bytes]] = []
    assert scan.commands(data, 0, out, *LIMITS) == 0
    assert out == []


def test_every_prefix_of_a_command_is_left_to_the_python_reader() -> None:
    data = _cmd(b"SET", b"key:1", b"x" * 120)
    for end in range(len(data)):
        assert scan.command(data[:end], 0, *LIMITS) is None, end
    assert scan.command(data, 0, *LIMITS) == ([b"SET", b"key:1", b"x" * 120], len(data))


def test_counts_and_lengths_over_the_limits_are_left_to_the_python_reader() -> None:
    data = _cmd(b"ECHO", b"x" * 10)
    assert scan.command(data, 0, 2, 10) is not None
    assert scan.command(data, 0, 1, 10) is None  # 2 arguments
    assert scan.command(data, 0, 2, 9) is None  # a 10-byte value
    assert scan.command(data, 0, 2, 3) is None  # the 4-byte name


def test_bad_calls_are_refused() -> None:
    with pytest.raises(ValueError, match="position"):
        scan.command(b"*1\r\n", 5, *LIMITS)
    with pytest.raises(ValueError, match="position"):
        scan.command(b"*1\r\n", -1, *LIMITS)
    with pytest.raises(ValueError, match="negative"):
        scan.command(b"*1\r\n", 0, -1, 1)
    with pytest.raises(TypeError):
        scan.command(bytearray(b"*1\r\n"), 0, *LIMITS)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        scan.commands(b"*1\r\n", 0, (), *LIMITS)  # type: ignore[arg-type]


# -- whole readers, with and without the scanner ---------------------------------------------


class _Hooks(PassThroughHooks):
    """Records every call; refuses ECHO whose argument has an odd length (so refusals
    come between allowed commands)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, list[bytes] | None]] = []

    def on_command(self, name: str, argc: int, args: Sequence[bytes] | None) -> bytes | None:
        self.calls.append((name, argc, None if args is None else list(args)))
        if name == "ECHO" and args is not None and len(args) > 1 and len(args[1]) % 2:
            return b"-NOPERM odd\r\n"
        return None


def _node(data: bytes, cuts: list[int], native: bool, limits: ProxyLimits) -> list[Any]:
    forwarded = bytearray()
    locals_: list[Local] = []
    pending: deque[Item] = deque()
    hooks = _Hooks()
    parser = CommandParser(
        hooks=hooks, limits=limits, forward=forwarded.extend, local=locals_.append,
        pending=pending, inspect=("*",), native=native,
    )  # fmt: skip
    assert (parser._scan is not None) == native
    error = None
    try:
        for piece in pieces(data, cuts):
            parser.feed(piece)
    except ProtocolError as exc:
        error = exc.reply
    return [
        bytes(forwarded), [x.reply for x in locals_], list(pending), hooks.calls, error,
        parser.commands, parser.refused, parser.at_boundary, parser.buffered,
    ]  # fmt: skip


def _cluster(data: bytes, cuts: list[int], native: bool, limits: ProxyLimits) -> list[Any]:
    reader = CommandReader(limits, native=native)
    assert (reader._scan is not None) == native
    seen: list[Any] = []
    for piece in pieces(data, cuts):
        try:
            batch = reader.feed(piece)
        except ProtocolError as exc:
            seen.append(("error", exc.reply))
            break
        seen.append([(args, raw) for args, raw in batch])
        if reader.error is not None:
            seen.append(("error after", reader.error.reply))
            break
        seen.append((reader.held, reader.declared))
    return seen


@pytest.mark.parametrize("read", [_node, _cluster], ids=["node", "cluster"])
@pytest.mark.parametrize("limits", [ProxyLimits(), ProxyLimits(max_inspect=64, max_bulk=100)])
def test_readers_agree_with_and_without_the_scanner(read: Any, limits: ProxyLimits) -> None:
    """20,000 fuzz cases (valid, mutated length lines, stray CR/LF/NUL, broken payload
    ends, inline lines; random read boundaries, one byte per read in a tenth), and small
    limits so values and names cross them."""
    rng = random.Random(18)
    for i in range(20_000):
        data, cuts = case(rng)
        if rng.random() < 0.2:  # pipelines of plain commands, as clients send them
            data = b"".join(_cmd(b"SET", b"k%d" % j, b"v" * rng.randrange(130)) for j in range(9))
        with_scan = read(data, cuts, True, limits)
        without = read(data, cuts, False, limits)
        assert with_scan == without, (i, data, cuts)
