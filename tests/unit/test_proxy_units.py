"""The engine's parsers on their own: any split of the input gives the same result."""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Sequence

import pytest

from dbservice.engine.proxy import Action, Hello, PassThroughHooks, ProtocolError, ProxyLimits
from dbservice.engine.proxy.commands import CommandParser, parse_hello
from dbservice.engine.proxy.halfclose import EofSignal
from dbservice.engine.proxy.inline import encode_command, split_args
from dbservice.engine.proxy.pending import Item, Local
from dbservice.engine.proxy.replies import ReplyParser
from tests.kits.proxy import Recorder, cmd


def chunks(data: bytes, rng: random.Random, most: int) -> list[bytes]:
    out, i = [], 0
    while i < len(data):
        step = rng.randint(1, most)
        out.append(data[i : i + step])
        i += step
    return out


class Harness:
    def __init__(
        self, hooks: PassThroughHooks | None = None, inspect: Sequence[str] = (), **limits: int
    ) -> None:
        self.forwarded = bytearray()
        self.locals: list[bytes] = []
        self.pending: deque[Item] = deque()
        self.hooks = hooks or Recorder(refuse=["FLUSHALL"])
        self.parser = CommandParser(
            hooks=self.hooks,
            limits=ProxyLimits(**limits),
            forward=self.forwarded.extend,
            local=lambda item: self.locals.append(item.reply),
            pending=self.pending,
            inspect=inspect,
        )

    def feed(self, parts: Sequence[bytes]) -> None:
        for part in parts:
            self.parser.feed(part)


BIG = b"v" * 300_000
STREAM = (
    cmd("SET", "k", BIG)
    + cmd("GET", "k")
    + b"PING\r\n\r\n"
    + cmd("FLUSHALL")
    + cmd("SET", "big2", BIG)
    + cmd("SUBSCRIBE", "a", "b")
    + cmd("AUTH", "user", "pw")
    + cmd("HELLO", "3", "SETNAME", "x")
    + b'ECHO "a b"\n'
)
EXPECTED_FORWARD = (
    cmd("SET", "k", BIG)
    + cmd("GET", "k")
    + cmd("PING")
    + cmd("SET", "big2", BIG)
    + cmd("SUBSCRIBE", "a", "b")
    + cmd("AUTH", "user", "pw")
    + cmd("HELLO", "3", "SETNAME", "x")
    + cmd("ECHO", "a b")
)


@pytest.mark.parametrize("seed", range(12))
def test_command_stream_any_split(seed: int) -> None:
    rng = random.Random(seed)
    h = Harness()
    most = [1, 7, 64, 4096, 100_000, 1 << 20][seed % 6]
    h.feed(chunks(STREAM, rng, most) if most > 1 else [bytes([b]) for b in STREAM[:5000]])
    if most == 1:  # the rest in bigger pieces, to keep the test quick
        h.feed(chunks(STREAM[5000:], rng, 999))
    assert bytes(h.forwarded) == EXPECTED_FORWARD
    assert h.locals == [b"-ERR refused: FLUSHALL\r\n"]
    names = [i if isinstance(i, str) else getattr(i, "name", "?") for i in h.pending]
    assert names == ["SET", "GET", "PING", "SET", "SUBSCRIBE", "AUTH", "HELLO", "ECHO"]
    assert h.parser.buffered == 0


class ArgsRecorder(PassThroughHooks):
    def __init__(self) -> None:
        self.seen: list[tuple[str, int, tuple[bytes, ...] | None]] = []

    def on_command(self, name: str, argc: int, args: Sequence[bytes] | None) -> bytes | None:
        self.seen.append((name, argc, None if args is None else tuple(args)))
        return b"-ERR refused\r\n" if name == "FLUSHALL" else None


INSPECTED = [
    ("SET", b"k", b""),
    ("GET", b"k" * 9),
    ("SET", b"k" * 10, b"v" * 99),
    ("FLUSHALL", b"ASYNC"),
    ("SET", b"k", b"v" * 100),
    ("MSET", b"a", b"1", b"b" * 12, b"2" * 57),
    ("PING",),
    ("SET", b"big", b"v" * 70_000),
    ("GET", b"big"),
]


@pytest.mark.parametrize("seed", range(8))
def test_inspect_all_gives_every_commands_args_in_order_any_split(seed: int) -> None:
    """inspect=["*"] (the agent's audit): the hooks see each command's arguments once,
    in order; allowed bytes are forwarded as sent, a refused one is cut out in place; one
    larger than max_inspect streams with args None unless it came whole in one read."""
    hooks = ArgsRecorder()
    h = Harness(hooks, inspect=["*"])
    stream = b"".join(cmd(*c) for c in INSPECTED)
    most = [1, 3, 17, 64, 512, 4096, 100_000, 1 << 20][seed]
    h.feed(chunks(stream, random.Random(seed), most))
    expected = [(c[0], len(c), (c[0].encode(), *c[1:])) for c in INSPECTED]
    if hooks.seen[7][2] is None:  # split: larger than max_inspect, so it streamed
        expected[7] = (*expected[7][:2], None)
    assert hooks.seen == expected
    assert bytes(h.forwarded) == b"".join(cmd(*c) for c in INSPECTED if c[0] != "FLUSHALL")
    assert list(h.pending) == [c[0] for c in INSPECTED if c[0] != "FLUSHALL"]
    assert h.locals == [b"-ERR refused\r\n"]
    assert h.parser.commands == len(INSPECTED) and h.parser.refused == 1


def test_refused_large_command_is_skipped_while_streaming() -> None:
    h = Harness()
    stream = cmd("PING") + cmd("FLUSHALL", BIG) + cmd("PING")
    h.feed(chunks(stream, random.Random(1), 1000))
    assert bytes(h.forwarded) == cmd("PING") + cmd("PING")
    assert len(h.pending) == 2


def test_buffer_stays_small_while_a_large_value_streams() -> None:
    h = Harness()
    most = 0
    for part in chunks(cmd("SET", "k", b"x" * 2_000_000), random.Random(2), 3000):
        h.parser.feed(part)
        most = max(most, h.parser.buffered)
    assert most < 100
    assert len(h.forwarded) > 2_000_000


def test_inline_splitting() -> None:
    assert split_args(b"SET a b") == [b"SET", b"a", b"b"]
    assert split_args(b'SET "a b" \'c d\' "\\x41\\n"') == [b"SET", b"a b", b"c d", b"A\n"]
    assert split_args(b"  ") == []
    with pytest.raises(ProtocolError):
        split_args(b'GET "open')
    assert encode_command([b"GET", b"k"]) == b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"


def test_hello_parsing_and_rewrites() -> None:
    hello = parse_hello([b"HELLO", b"3", b"AUTH", b"u", b"p", b"SETNAME", b"n"])
    assert hello is not None and (hello.protover, hello.username, hello.setname) == (
        3,
        b"u",
        b"n",
    )
    assert hello.without_auth() == (b"HELLO", b"3", b"SETNAME", b"n")
    assert hello.with_auth(b"a", b"b")[:5] == (b"HELLO", b"3", b"AUTH", b"a", b"b")
    assert parse_hello([b"HELLO", b"x"]) is None
    assert parse_hello([b"HELLO", b"3", b"AUTH", b"u"]) is None


def test_auth_replacement_and_local_answer() -> None:
    class Hooks(PassThroughHooks):
        def on_auth(self, username: bytes | None, password: bytes) -> Action:
            if username == b"svc":
                return Action.respond(b"+OK\r\n")
            return Action.replace("AUTH", "app", "secret")

        def on_hello(self, hello: Hello) -> Action:
            return Action.replace(*hello.without_auth())

    h = Harness(Hooks())
    h.feed(
        [
            cmd("AUTH", "svc", "x")
            + cmd("AUTH", "pw")
            + cmd("HELLO", "3", "AUTH", "u", "p")
            + cmd("GET", "k")
        ]
    )
    assert bytes(h.forwarded) == cmd("AUTH", "app", "secret") + cmd("HELLO", "3") + cmd("GET", "k")
    assert h.locals == [b"+OK\r\n"]


def test_limits() -> None:
    for data, limits in [
        (cmd("SET", "k", "v" * 100), {"max_bulk": 10}),
        (cmd("MSET", "a", "b", "c", "d"), {"max_multibulk": 3}),
        (b"x" * 200, {"max_inline": 100}),
    ]:
        with pytest.raises(ProtocolError):
            Harness(**limits).feed([data])


class ReplyHarness:
    def __init__(self, **limits: int) -> None:
        self.out = bytearray()
        self.pending: deque[Item] = deque()
        self.hooks = Recorder()
        self.parser = ReplyParser(
            hooks=self.hooks,
            limits=ProxyLimits(**limits),
            write=self.out.extend,
            pending=self.pending,
            on_close_reply=lambda: None,
        )


REPLIES = (
    b"+OK\r\n"
    + b">3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$5\r\nhello\r\n"  # a push between replies
    + b"$300000\r\n" + BIG + b"\r\n"
    + b"%2\r\n$1\r\na\r\n*2\r\n:1\r\n:2\r\n$1\r\nb\r\n~1\r\n,1.5\r\n"
    + b"|1\r\n+key-popularity\r\n%0\r\n:7\r\n"  # an attribute, then the reply
    + b">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nk\r\n"
    + b"-ERR nope\r\n"
    + b"*-1\r\n"
    + b"_\r\n"
    + b"*3\r\n*1\r\n*1\r\n:1\r\n$-1\r\n#t\r\n"
)  # fmt: skip
REPLY_NAMES = ["SET", "GET", "HGETALL", "INCR", "BAD", "X", "Y", "Z"]


@pytest.mark.parametrize("seed", range(10))
def test_reply_stream_any_split(seed: int) -> None:
    rng = random.Random(seed)
    h = ReplyHarness()
    h.parser.resp3 = True
    h.pending.extend(REPLY_NAMES[:4])
    h.pending.append(Local(b"-ERR local\r\n"))
    h.pending.extend(REPLY_NAMES[4:])
    for part in chunks(REPLIES, rng, [1, 5, 50, 5000, 1 << 20][seed % 5]):
        h.parser.feed(part)
    at = REPLIES.index(b">2\r\n$10\r\ninvalidate")
    # the engine's reply goes out right after the reply to the command before it
    assert bytes(h.out) == REPLIES[:at] + b"-ERR local\r\n" + REPLIES[at:]
    assert h.hooks.replies == [(n, n == "BAD") for n in REPLY_NAMES]
    assert h.parser.pushes == 2
    assert not h.pending and h.parser.at_boundary


@pytest.mark.parametrize("seed", range(5))
def test_hooks_with_reply_names_hear_only_of_those_replies(seed: int) -> None:
    """Hooks with ``reply_names`` (the agent's: AUTH and HELLO) are told only of the
    replies to those commands, in order; what the client gets is the same."""
    rng = random.Random(seed)
    h = ReplyHarness()
    h.hooks.reply_names = frozenset({"GET", "BAD", "Z"})  # type: ignore[attr-defined]
    h.parser = ReplyParser(
        hooks=h.hooks,
        limits=ProxyLimits(),
        write=h.out.extend,
        pending=h.pending,
        on_close_reply=lambda: None,
    )
    h.parser.resp3 = True
    h.pending.extend(REPLY_NAMES[:4])
    h.pending.append(Local(b"-ERR local\r\n"))
    h.pending.extend(REPLY_NAMES[4:])
    for part in chunks(REPLIES, rng, [1, 5, 50, 5000, 1 << 20][seed % 5]):
        h.parser.feed(part)
    at = REPLIES.index(b">2\r\n$10\r\ninvalidate")
    assert bytes(h.out) == REPLIES[:at] + b"-ERR local\r\n" + REPLIES[at:]
    assert h.hooks.replies == [("GET", False), ("BAD", True), ("Z", False)]
    assert h.parser.replies == len(REPLY_NAMES)
    assert EofSignal(h.hooks, "EOF", lambda: None).reply_names == frozenset({"GET", "BAD", "Z"})


def test_reply_nesting_has_no_limit() -> None:
    """A reply nested deeper than ``max_reply_nesting`` (the set-up replies' bound)
    still reaches the client whole, and the next reply is matched to its command."""
    h = ReplyHarness(max_reply_nesting=8)
    h.pending.extend(["EVAL", "PING"])
    deep = b"*1\r\n" * 5000 + b":1\r\n"
    for i in range(0, len(deep), 7):
        h.parser.feed(deep[i : i + 7])
    h.parser.feed(b"+PONG\r\n")
    assert bytes(h.out) == deep + b"+PONG\r\n"
    assert h.hooks.replies == [("EVAL", False), ("PING", False)]
